//! Batch scale-out over the shared job queue: a scaled-out batch run's group jobs
//! ([`GroupJob`], computed by `batch::groups`) travel on their own apalis queue in the state
//! DB, and every `lambda-ctl worker` — and the process running the batch run — takes them.
//! apalis re-delivers the job of a worker that stops sending heartbeats, so a killed worker's
//! group is computed elsewhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::queue::{Handler, Job, Queue};
use crate::batch::groups::{self, Fanout, GroupJob};
use crate::batch::{self, BatchError, Progress, RunSummary, ScaleOut};
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Project;
use crate::state::State;

/// How long a scaled-out run leaves its groups to the workers before working on them itself.
pub const HELP_AFTER: Duration = Duration::from_secs(1);

impl Job for GroupJob {
    const QUEUE: &'static str = "lambda_ctl_batch_groups";
    const WHAT: &'static str = "batch group";

    fn key(&self) -> String {
        format!("group:{}/{}/{}", self.pipeline, self.run_id, self.group)
    }
}

/// The queue of group jobs in the state DB.
#[derive(Clone, Debug)]
pub struct Groups {
    queue: Queue<GroupJob>,
}

impl Groups {
    pub async fn open(state: &State) -> anyhow::Result<Groups> {
        Ok(Groups {
            queue: Queue::open(state).await?,
        })
    }

    /// Computes group jobs of `project`'s pipelines, `concurrency` at a time, until
    /// `shutdown`; the returned thread ends after it.
    pub fn work(
        &self,
        project: Arc<Project>,
        lake: Lake,
        name: String,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let plans: Arc<Mutex<HashMap<String, Arc<Plan>>>> = Arc::default();
        let worker = name.clone();
        let handler: Handler<GroupJob> = Arc::new(move |job: GroupJob| {
            let (project, lake, plans, worker) =
                (project.clone(), lake.clone(), plans.clone(), worker.clone());
            Box::pin(async move {
                tokio::spawn(async move {
                    let plan = match plan(&project, &plans, &job.pipeline) {
                        Ok(p) => p,
                        Err(e) => {
                            // Recorded for the run, which fails with this message.
                            let msg = format!("{e:#}");
                            lake.put(&job.error_path(), msg.into_bytes()).await?;
                            return Ok(());
                        }
                    };
                    info!(
                        %worker, run = job.run_id, group = job.group,
                        segments = job.segments.len(), "computing batch group"
                    );
                    let started = std::time::Instant::now();
                    match groups::compute(&plan, &lake, &job).await {
                        Ok(()) => info!(
                            %worker, run = job.run_id, group = job.group,
                            segments = job.segments.len(), ms = started.elapsed().as_millis() as u64,
                            "computed batch group"
                        ),
                        Err(e) => warn!(
                            %worker, run = job.run_id, group = job.group,
                            error = %format!("{e:#}"), "batch group failed"
                        ),
                    }
                    Ok(())
                })
                .await
                .context("batch group panicked")?
            })
        });
        let queue = self.queue.clone();
        let runtime = tokio::runtime::Handle::current();
        // apalis' worker future is not `Send` (see `Orchestrator::start`): a blocking thread
        // drives it; the groups themselves run on the runtime.
        tokio::task::spawn_blocking(move || {
            let work = queue.work(format!("{name}/groups"), concurrency, handler, shutdown);
            if let Err(e) = runtime.block_on(work) {
                warn!(error = %format!("{e:#}"), "batch group workers stopped");
            }
        })
    }
}

impl Fanout for Groups {
    fn submit<'a>(&'a self, jobs: &'a [GroupJob]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for job in jobs {
                self.queue.push(job.clone(), Duration::ZERO).await?;
            }
            Ok(())
        })
    }
}

/// A batch run as the project's `batch:` settings say: in this process, or — when
/// `scale_out_segments` is set — with big views split into group jobs on the queue, which this
/// process works on too (one group per core) once they have waited [`HELP_AFTER`].
pub async fn recompute(
    project: &Arc<Project>,
    plan: Arc<Plan>,
    state: &State,
    lake: &Lake,
    views: Option<&[String]>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RunSummary, BatchError> {
    let settings = project.settings.batch;
    if settings.scale_out_segments == 0 {
        return batch::recompute(plan, state, lake, views, progress).await;
    }
    let fanout = Groups::open(state)
        .await
        .context("opening the batch group queue")?;
    let stop = CancellationToken::new();
    // Workers get the first go at the groups; this process joins in after a moment, so a run
    // ends even when no worker is running.
    let working = tokio::spawn({
        let (fanout, project, lake, stop) =
            (fanout.clone(), project.clone(), lake.clone(), stop.clone());
        async move {
            tokio::select! {
                () = tokio::time::sleep(HELP_AFTER) => {}
                () = stop.cancelled() => return,
            }
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let name = format!("lambda-ctl-run:{}", std::process::id());
            if let Err(e) = fanout.work(project, lake, name, cores, stop).await {
                warn!(error = %e, "batch group worker ended abnormally");
            }
        }
    });
    let scale = ScaleOut {
        settings,
        fanout: &fanout,
    };
    let result = batch::recompute_scaled(plan, state, lake, views, Some(scale), progress).await;
    stop.cancel();
    let _ = working.await;
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
