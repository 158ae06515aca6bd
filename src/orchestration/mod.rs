//! Workflows (SPEC.md "Workflow", DESIGN.md §6): cron schedules in a time zone, DAGs of tasks,
//! retries with exponential back-off, timeouts, catch-up, backfill and `max_active_runs`,
//! across any number of processes sharing one state DB.
//!
//! ```text
//!  scheduler (one active) ──claim slot──► runs (state DB) ◄──advance (per-workflow lock)──┐
//!        │                                   │                                          │
//!        └── sweep: lost / unqueued ──┐      └─ queued attempts ──► apalis queue ──► workers
//! ```
//!
//! - [`slots`]: when a schedule fires in its time zone, DST included.
//! - [`dag`]: the pure decision of what happens next in a workflow (retries, upstream
//!   failures, admission up to `max_active_runs`).
//! - [`queue`]: apalis over the state DB; one job per task attempt, keyed by
//!   (run, task, attempt).
//! - [`fanout`]: the group jobs of scaled-out batch runs, on their own queue.
//! - [`tasks`]: executing a task; [`TaskRunner`] is the boundary to the batch layer and the
//!   lake/archive owners, `command` tasks are implemented here; [`layers`] is the runner of a
//!   real project (batch recompute).
//! - the scheduler (slot claims, leadership, recovery sweeps) and the worker (claim, run under
//!   timeout with heartbeats, record) are private.
//!
//! The state DB is the source of truth: runs and attempts are rows whose transitions are
//! compare-and-set, every decision about a workflow happens in one transaction that holds the
//! workflow's lock, and the queue is only a transport — a job delivered twice still executes
//! its attempt once.

pub mod api;
pub mod clock;
pub mod dag;
pub mod fanout;
pub mod layers;
pub mod overview;
pub mod queue;
mod scheduler;
pub mod slots;
pub mod tasks;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use clock::{Clock, ManualClock, SystemClock};
pub use tasks::{TaskContext, TaskRunner};

use crate::spec::{Project, Workflow};
use crate::state::{
    Advanced, Run, RunId, RunKind, RunState, State, StateError, TaskAttempt, WorkflowEvent,
};
use queue::{AttemptJob, Queue};

/// Most runs one backfill may create.
pub const MAX_BACKFILL_RUNS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum OrchestrationError {
    #[error("unknown workflow `{name}`{hint}")]
    UnknownWorkflow { name: String, hint: String },
    #[error(
        "workflow `{0}` has no schedule, so it has no slots to backfill (use `lambda-ctl run {0}`)"
    )]
    NotScheduled(String),
    #[error("the backfill range is empty: --from {from} is after --to {to}")]
    EmptyRange {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    #[error(
        "the backfill range holds more than {max} slots of workflow `{workflow}`; backfill a shorter range"
    )]
    TooManySlots { workflow: String, max: usize },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0:#}")]
    Queue(anyhow::Error),
}

/// What a process runs: `serve` everything, `lambda-ctl worker` only workers.
#[derive(Debug, Clone)]
pub struct Options {
    /// Compete for the scheduler role (one active per state DB).
    pub scheduler: bool,
    /// Task attempts this process executes at once; 0 runs no worker.
    pub concurrency: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            scheduler: true,
            concurrency: 4,
        }
    }
}

/// Shared by the scheduler, the workers and the API.
pub(crate) struct Core {
    pub(crate) project: Arc<Project>,
    pub(crate) state: State,
    pub(crate) queue: Queue,
    pub(crate) runner: Arc<dyn TaskRunner>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Names this process in logs and in apalis' worker table.
    pub(crate) worker_name: String,
}

impl Core {
    /// Applies `event` to the workflow and decides what follows, in one transaction; queues the
    /// attempts that became ready.
    pub(crate) async fn advance(
        &self,
        workflow: &Workflow,
        event: WorkflowEvent,
    ) -> anyhow::Result<Advanced> {
        let now = self.clock.now();
        let advanced = self
            .state
            .advance_workflow(
                &workflow.name,
                event,
                workflow.max_active_runs,
                |snapshot| dag::decide(workflow, snapshot, now),
            )
            .await?;
        for run in &advanced.started {
            info!(workflow = %workflow.name, run = run.0, "run started");
        }
        for run in &advanced.finished {
            info!(workflow = %workflow.name, run = run.id.0, state = %run.state, "run finished");
        }
        // A failed push is repaired by the sweep, which re-pushes old queued attempts.
        if let Err(e) = self.enqueue(&workflow.name, &advanced.queued).await {
            warn!(workflow = %workflow.name, error = %format!("{e:#}"), "cannot queue task attempts; the sweep will retry");
        }
        Ok(advanced)
    }

    pub(crate) async fn enqueue(
        &self,
        workflow: &str,
        attempts: &[TaskAttempt],
    ) -> anyhow::Result<()> {
        let now = self.clock.now();
        for attempt in attempts {
            // The queue delays by the wall clock, so a retry does not hold a worker during its
            // back-off; the worker also waits on our clock, which alone decides when the clock
            // is not the wall clock (tests).
            let delay = match attempt.scheduled_at {
                Some(at) if self.clock.is_wall_clock() => (at - now).to_std().unwrap_or_default(),
                _ => Duration::ZERO,
            };
            self.queue
                .push(AttemptJob::new(workflow, attempt), delay)
                .await?;
        }
        Ok(())
    }

    fn workflow(&self, name: &str) -> Result<&Workflow, OrchestrationError> {
        self.project.workflow(name).ok_or_else(|| {
            let names = self.project.workflows.iter().map(|w| w.name.as_str());
            OrchestrationError::UnknownWorkflow {
                name: name.to_string(),
                hint: crate::spec::diag::did_you_mean(name, names),
            }
        })
    }
}

/// A task of a run and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    pub name: String,
    /// The latest attempt's state; `None` while the task waits for its needs.
    pub state: Option<RunState>,
    /// Attempts so far.
    pub attempts: u32,
    pub error: Option<String>,
}

/// A run with its tasks (`lambda-ctl run --wait`, `GET /v1/runs/{id}`).
#[derive(Debug, Clone)]
pub struct RunStatus {
    pub run: Run,
    /// In the workflow's task order.
    pub tasks: Vec<TaskStatus>,
}

/// A run's log and every attempt's log (`lambda-ctl logs RUN_ID`).
#[derive(Debug, Clone)]
pub struct RunLogs {
    pub run: Run,
    pub attempts: Vec<TaskAttempt>,
}

/// The orchestrator of one process: the API, and (once started) its scheduler and workers.
#[derive(Clone)]
pub struct Orchestrator {
    core: Arc<Core>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("worker", &self.core.worker_name)
            .finish()
    }
}

/// The scheduler and workers of a started [`Orchestrator`].
pub struct Running {
    tasks: JoinSet<()>,
}

impl Running {
    /// Waits until the scheduler and workers stopped (after the shutdown token fired).
    pub async fn join(mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "orchestration task ended abnormally");
            }
        }
    }
}

impl Orchestrator {
    /// Opens the job queue in the state DB (creating its tables) for `project`. Uses the system
    /// clock; see [`Orchestrator::with_clock`].
    pub async fn open(
        project: Arc<Project>,
        state: State,
        runner: Arc<dyn TaskRunner>,
    ) -> anyhow::Result<Orchestrator> {
        let queue = Queue::open(&state).await?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let worker_name = format!("lambda-ctl@{host}:{}", std::process::id());
        Ok(Orchestrator {
            core: Arc::new(Core {
                project,
                state,
                queue,
                runner,
                clock: Arc::new(SystemClock),
                worker_name,
            }),
        })
    }

    /// Replaces the clock (tests drive schedules, back-off and timeouts with a
    /// [`ManualClock`]). Call before [`Orchestrator::start`].
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Orchestrator {
        let core = &self.core;
        Orchestrator {
            core: Arc::new(Core {
                project: core.project.clone(),
                state: core.state.clone(),
                queue: core.queue.clone(),
                runner: core.runner.clone(),
                clock,
                worker_name: core.worker_name.clone(),
            }),
        }
    }

    /// What `serve` runs: the scheduler (active or standing by) and workers, until `shutdown`.
    pub async fn start_all(
        project: Arc<Project>,
        state: State,
        runner: Arc<dyn TaskRunner>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Orchestrator, Running)> {
        let orchestrator = Orchestrator::open(project, state, runner).await?;
        let running = orchestrator.start(&Options::default(), shutdown);
        Ok((orchestrator, running))
    }

    /// Starts the scheduler and/or workers per `options`, until `shutdown`.
    pub fn start(&self, options: &Options, shutdown: CancellationToken) -> Running {
        let mut tasks = JoinSet::new();
        if options.scheduler {
            tasks.spawn(scheduler::run(self.core.clone(), shutdown.clone()));
        }
        if options.concurrency > 0 {
            let core = self.core.clone();
            let stop = shutdown.clone();
            let handler: queue::Handler = Arc::new(move |job| {
                let core = core.clone();
                let stop = stop.clone();
                // Spawned, so attempts run in parallel on the runtime's threads rather than on
                // the one thread that drives the queue.
                Box::pin(async move {
                    tokio::spawn(worker::handle(core, job, stop))
                        .await
                        .context("task attempt panicked")?
                })
            });
            let queue = self.core.queue.clone();
            let name = self.core.worker_name.clone();
            let concurrency = options.concurrency;
            // apalis' worker future is not provably `Send` (higher-ranked lifetimes inside
            // apalis), so it cannot be spawned; a blocking thread drives it on this runtime
            // instead. Task attempts themselves still run on the runtime's worker threads.
            let runtime = tokio::runtime::Handle::current();
            tasks.spawn_blocking(move || {
                let work = queue.work(name, concurrency, handler, shutdown);
                if let Err(e) = runtime.block_on(work) {
                    warn!(error = %format!("{e:#}"), "workers stopped");
                }
            });
        }
        Running { tasks }
    }

    /// The project whose workflows this orchestrator runs.
    pub fn project(&self) -> &Project {
        &self.core.project
    }

    /// Starts a run of `workflow` now (not tied to a schedule slot). It waits for a free
    /// `max_active_runs` place like any other run.
    pub async fn trigger(&self, workflow: &str) -> Result<RunId, OrchestrationError> {
        let wf = self.core.workflow(workflow)?;
        let run = self
            .core
            .state
            .create_run(RunKind::Workflow, &wf.name, None)
            .await?;
        info!(workflow = %wf.name, run = run.id.0, "run triggered");
        self.core
            .advance(wf, WorkflowEvent::Reconcile)
            .await
            .map_err(OrchestrationError::Queue)?;
        Ok(run.id)
    }

    /// One run per schedule slot in `[from, to]`, oldest first; they start as
    /// `max_active_runs` allows. Slots that already have a run which succeeded or is still
    /// going are skipped (failed or cancelled ones run again). Returns the new runs' ids.
    pub async fn backfill(
        &self,
        workflow: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<RunId>, OrchestrationError> {
        let wf = self.core.workflow(workflow)?;
        let schedule = wf
            .schedule
            .as_ref()
            .ok_or_else(|| OrchestrationError::NotScheduled(wf.name.clone()))?;
        if from > to {
            return Err(OrchestrationError::EmptyRange { from, to });
        }
        let just_before = from - chrono::Duration::microseconds(1);
        let slots: Vec<DateTime<Utc>> = slots::between(schedule, wf.timezone, just_before, to)
            .take(MAX_BACKFILL_RUNS + 1)
            .collect();
        if slots.len() > MAX_BACKFILL_RUNS {
            return Err(OrchestrationError::TooManySlots {
                workflow: wf.name.clone(),
                max: MAX_BACKFILL_RUNS,
            });
        }
        let done = self.core.state.covered_slots(&wf.name, from, to).await?;
        let skipped = slots.iter().filter(|s| done.contains(s)).count();
        let mut ids = Vec::with_capacity(slots.len());
        for slot in slots.into_iter().filter(|s| !done.contains(s)) {
            let run = self
                .core
                .state
                .create_run(RunKind::Workflow, &wf.name, Some(slot))
                .await?;
            ids.push(run.id);
        }
        info!(workflow = %wf.name, runs = ids.len(), skipped, "backfill queued");
        self.core
            .advance(wf, WorkflowEvent::Reconcile)
            .await
            .map_err(OrchestrationError::Queue)?;
        Ok(ids)
    }

    pub async fn run_status(&self, id: RunId) -> Result<Option<RunStatus>, OrchestrationError> {
        let Some(run) = self.core.state.run(id).await? else {
            return Ok(None);
        };
        let attempts = self.core.state.task_attempts(id).await?;
        let names: Vec<String> = match self.core.project.workflow(&run.name) {
            Some(wf) if run.kind == RunKind::Workflow => {
                wf.tasks.iter().map(|t| t.name.clone()).collect()
            }
            _ => {
                let mut names: Vec<String> = Vec::new();
                for a in &attempts {
                    if !names.contains(&a.task) {
                        names.push(a.task.clone());
                    }
                }
                names
            }
        };
        let tasks = names
            .into_iter()
            .map(|name| {
                let mine: Vec<&TaskAttempt> = attempts.iter().filter(|a| a.task == name).collect();
                let latest = mine.iter().max_by_key(|a| a.attempt);
                TaskStatus {
                    state: latest.map(|a| a.state),
                    attempts: u32::try_from(mine.len()).unwrap_or(u32::MAX),
                    error: latest.and_then(|a| a.error.clone()),
                    name,
                }
            })
            .collect();
        Ok(Some(RunStatus { run, tasks }))
    }

    /// The newest runs first, of one workflow or all.
    pub async fn runs(
        &self,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Run>, OrchestrationError> {
        Ok(self.core.state.runs(workflow, limit).await?)
    }

    pub async fn logs(&self, id: RunId) -> Result<Option<RunLogs>, OrchestrationError> {
        let Some(run) = self.core.state.run(id).await? else {
            return Ok(None);
        };
        let attempts = self.core.state.task_attempts(id).await?;
        Ok(Some(RunLogs { run, attempts }))
    }

    /// When `workflow` fires next: the first slot after both its last scheduled slot and now.
    /// `None` for a workflow without a schedule.
    pub async fn next_fire(
        &self,
        workflow: &str,
    ) -> Result<Option<DateTime<Utc>>, OrchestrationError> {
        let wf = self.core.workflow(workflow)?;
        if wf.schedule.is_none() {
            return Ok(None);
        }
        let last = self.core.state.last_slot(&wf.name).await?;
        Ok(overview::next_fire(wf, last, self.core.clock.now()))
    }

    /// Waits until run `id` has finished, calling `progress` whenever it changed; returns the
    /// finished run's status.
    pub async fn wait(
        &self,
        id: RunId,
        mut progress: impl FnMut(&RunStatus),
        shutdown: &CancellationToken,
    ) -> anyhow::Result<RunStatus> {
        let mut last: Option<(RunState, Vec<TaskStatus>)> = None;
        loop {
            let status = self
                .run_status(id)
                .await?
                .with_context(|| format!("run {id} does not exist"))?;
            let key = (status.run.state, status.tasks.clone());
            if last.as_ref() != Some(&key) {
                progress(&status);
                last = Some(key);
            }
            if status.run.state.is_finished() {
                return Ok(status);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = shutdown.cancelled() => anyhow::bail!("stopped waiting for run {id}"),
            }
        }
    }
}
