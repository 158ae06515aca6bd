//! Batch scale-out over the shared job queue: the jobs of a scaled-out batch run (its groups
//! and its finish job, see `batch::scaleout`) travel on their own apalis queue in the state DB,
//! and every `lambda-ctl worker`, every `serve`, and the process running the batch run take
//! them. apalis re-delivers the job of a worker that stops sending heartbeats, so a killed
//! worker's group — or finish — is done elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::queue::{Handler, Job, Queue};
use crate::batch::scaleout::{self, Fanout, FinishJob, GroupJob};
use crate::batch::{self, BatchError, Progress, RunSummary, ScaleOut};
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Project;
use crate::speed::runtime::PipelineRuntime;
use crate::state::State;

/// A job of a scaled-out batch run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchJob {
    Group(GroupJob),
    Finish(FinishJob),
}

impl Job for BatchJob {
    const QUEUE: &'static str = "lambda_ctl_batch_groups";
    const WHAT: &'static str = "batch job";
    // A run waits on its groups one after another: a worker finishing one looks for the next
    // sooner than a task worker does.
    const POLL: Duration = Duration::from_millis(50);

    fn key(&self) -> String {
        match self {
            BatchJob::Group(g) => format!("group:{}/{}/{}", g.pipeline, g.run_id, g.group),
            BatchJob::Finish(f) => format!("finish:{}/{}", f.pipeline, f.run_id),
        }
    }
}

/// The queue of batch jobs in the state DB.
#[derive(Clone)]
pub struct Groups {
    queue: Queue<BatchJob>,
    /// The pipelines the working process serves: their jobs are computed by the definitions
    /// those run (a promote may have switched one since the start).
    serving: Arc<BTreeMap<String, Arc<PipelineRuntime>>>,
}

/// What a process working the queue needs.
#[derive(Clone)]
struct BatchWorker {
    project: Arc<Project>,
    state: State,
    lake: Lake,
    queue: Groups,
    plans: Arc<Mutex<HashMap<String, Arc<Plan>>>>,
    worker: String,
}

impl Groups {
    pub async fn open(state: &State) -> anyhow::Result<Groups> {
        Ok(Groups {
            queue: Queue::open(state).await?,
            serving: Arc::default(),
        })
    }

    /// Groups whose jobs of the pipelines in `serving` are computed by the definitions those
    /// run (a server's own job worker).
    pub fn serving(self, serving: BTreeMap<String, Arc<PipelineRuntime>>) -> Groups {
        Groups {
            serving: Arc::new(serving),
            ..self
        }
    }

    /// Does the batch jobs of `project`'s pipelines, `concurrency` at a time, until
    /// `shutdown`; the returned thread ends after it.
    pub fn work(
        &self,
        project: Arc<Project>,
        state: State,
        lake: Lake,
        name: String,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cx = BatchWorker {
            project,
            state,
            lake,
            queue: self.clone(),
            plans: Arc::default(),
            worker: name.clone(),
        };
        let handler: Handler<BatchJob> = Arc::new(move |job: BatchJob| {
            let cx = cx.clone();
            // Spawned: the queue's own thread only hands jobs out.
            Box::pin(async move {
                tokio::spawn(async move { cx.handle(job).await })
                    .await
                    .context("batch job panicked")?
            })
        });
        let queue = self.queue.clone();
        let runtime = tokio::runtime::Handle::current();
        // apalis' worker future is not `Send` (see `Orchestrator::start`): a blocking thread
        // drives it; the jobs themselves run on the runtime.
        tokio::task::spawn_blocking(move || {
            let work = queue.work(format!("{name}/batch"), concurrency, handler, shutdown);
            if let Err(e) = runtime.block_on(work) {
                warn!(error = %format!("{e:#}"), "batch job workers stopped");
            }
        })
    }
}

impl BatchWorker {
    /// Does one job; an error means its outcome could not be recorded (delivered again).
    async fn handle(&self, job: BatchJob) -> anyhow::Result<()> {
        let (pipeline, run) = match &job {
            BatchJob::Group(g) => (&g.pipeline, g.run_id),
            BatchJob::Finish(f) => (&f.pipeline, f.run_id),
        };
        let plan = match self.queue.serving.get(pipeline.as_str()) {
            Some(rt) => Ok(rt.plan()),
            None => plan(&self.project, &self.plans, pipeline),
        };
        let worker = &self.worker;
        match job {
            BatchJob::Group(job) => {
                let finish =
                    scaleout::work_group(plan, &self.state, &self.lake, worker, &job).await?;
                if let Some(finish) = finish {
                    info!(%worker, run, "last batch group done; queueing the run's finish job");
                    self.queue.finish(&finish).await?;
                }
                Ok(())
            }
            BatchJob::Finish(job) => {
                let plan = match plan {
                    Ok(p) => p,
                    Err(e) => {
                        // Another process, with the pipeline, may take it on a later delivery.
                        return Err(e.context("cannot finish the batch run"));
                    }
                };
                info!(%worker, run, "finishing batch run");
                scaleout::finish(&plan, &self.state, &self.lake, &job).await
            }
        }
    }
}

impl Fanout for Groups {
    fn submit<'a>(&'a self, jobs: &'a [GroupJob]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for job in jobs {
                self.queue
                    .push(BatchJob::Group(job.clone()), Duration::ZERO)
                    .await?;
            }
            Ok(())
        })
    }

    fn finish<'a>(&'a self, job: &'a FinishJob) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.queue
                .push(BatchJob::Finish(job.clone()), Duration::ZERO)
                .await
        })
    }
}

/// Whether the process of a scaled-out run works on the run's jobs itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Help {
    /// Yes, one job per core, once its jobs have made no progress for
    /// [`scaleout::HELP_AFTER`] (no free worker, or none running): a run ends even when no
    /// worker is running, and takes nothing from workers that keep up.
    AfterAMoment,
    /// No: the process works the queue already (`serve`, one job at a time so serving comes
    /// first; `lambda-ctl worker`).
    No,
}

/// A batch run as the project's `batch:` settings say: in this process, or — when
/// `scale_out_segments` is set and reached — as jobs on the queue, which this process works on
/// too as `help` says.
pub async fn recompute(
    project: &Arc<Project>,
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    select: batch::Select<'_>,
    help: Help,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    let settings = project.settings.batch;
    if settings.scale_out_segments == 0 {
        return batch::recompute(plan, state, lake, select, progress).await;
    }
    let fanout = Groups::open(state)
        .await
        .context("opening the batch group queue")?;
    let stop = CancellationToken::new();
    // Workers get the first go at the jobs; this process joins in when they stall.
    let stalled = Arc::new(tokio::sync::Notify::new());
    let working = (help == Help::AfterAMoment).then(|| {
        tokio::spawn({
            let (fanout, project, state, lake, stop, stalled) = (
                fanout.clone(),
                project.clone(),
                state.clone(),
                lake.clone(),
                stop.clone(),
                stalled.clone(),
            );
            async move {
                tokio::select! {
                    () = stalled.notified() => {}
                    () = stop.cancelled() => return,
                }
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let name = format!("lambda-ctl-run:{}", std::process::id());
                if let Err(e) = fanout.work(project, state, lake, name, cores, stop).await {
                    warn!(error = %e, "batch group worker ended abnormally");
                }
            }
        })
    });
    let scale = ScaleOut {
        settings,
        fanout: &fanout,
        help: (help == Help::AfterAMoment).then_some(&*stalled),
    };
    let result = batch::recompute_scaled(plan, state, lake, select, Some(scale), progress).await;
    stop.cancel();
    if let Some(working) = working {
        let _ = working.await;
    }
    result
}

/// The compiled plan of `pipeline`, compiled once per process.
fn plan(
    project: &Project,
    plans: &Mutex<HashMap<String, Arc<Plan>>>,
    pipeline: &str,
) -> anyhow::Result<Arc<Plan>> {
    if let Some(p) = plans.lock().get(pipeline) {
        return Ok(p.clone());
    }
    let spec = project
        .pipeline(pipeline)
        .with_context(|| format!("pipeline `{pipeline}` is not in this worker's project"))?;
    let plan =
        Arc::new(Plan::compile(spec).with_context(|| format!("compiling pipeline `{pipeline}`"))?);
    plans.lock().insert(pipeline.to_string(), plan.clone());
    Ok(plan)
}

#[cfg(test)]
mod tests;
