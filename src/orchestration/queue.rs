//! The job queues: apalis with the state DB as storage (apalis-sqlite embedded, apalis-postgres
//! with a PostgreSQL state), wrapped here once so an apalis upgrade touches one file. Two kinds
//! of [`Job`] travel on it, each on its own apalis queue: task attempts ([`AttemptJob`], below)
//! and the groups and finish job of a scaled-out batch run (`fanout::BatchJob`).
//!
//! A job is one task attempt, keyed `RUN/TASK/ATTEMPT` with apalis' idempotency key, so pushing
//! it again (the recovery sweep, or two processes racing) never makes a second job. The queue
//! only carries attempts; whether one runs is decided by the attempt row (`queued → running` is
//! a compare-and-set), so even a job delivered twice executes once. Task retries are new
//! attempts (new jobs) decided by orchestration; apalis' own re-delivery is kept for the case
//! where the handler could not reach the state DB at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::state::{Pool, State, TaskAttempt};

/// What can travel on a [`Queue`].
pub trait Job: Serialize + DeserializeOwned + Clone + Send + Sync + Unpin + 'static {
    /// The apalis queue (job type) name.
    const QUEUE: &'static str;
    /// What it says in logs.
    const WHAT: &'static str;
    /// How often an idle worker looks for new jobs.
    const POLL: Duration = POLL_INTERVAL;
    /// Unique per job: pushing a job whose key is queued already is a no-op.
    fn key(&self) -> String;
}
/// SQLite: apalis' migration history, kept apart from ours (both would otherwise share
/// `_sqlx_migrations`, and each migrator rejects the other's versions).
const SQLITE_MIGRATIONS_TABLE: &str = "_apalis_migrations";
/// How often an idle worker looks for new jobs. Jobs pushed by this process wake no one, so
/// this bounds the pause between two tasks of a DAG.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// apalis worker liveness: a worker silent for `HEARTBEAT × MISSED_HEARTBEATS` is dead and its
/// jobs go back to the queue.
const HEARTBEAT: Duration = Duration::from_secs(5);
const MISSED_HEARTBEATS: usize = 3;
/// Deliveries of one job when the handler cannot reach the state DB.
const DELIVERIES: usize = 5;

/// Wakes an idle worker every `interval` to look for jobs. apalis' own `IntervalStrategy`
/// re-arms its timer without polling it, so no wake-up is registered after its first tick: an
/// idle worker then looked for jobs only when its heartbeat woke it (every [`HEARTBEAT`]),
/// and a scaled-out run's groups went to whichever worker happened to be busy already.
struct Every {
    interval: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Every {
    fn new(interval: Duration) -> Every {
        Every {
            interval,
            timer: None,
        }
    }
}

impl PollStrategy for Every {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &PollSnapshot,
    ) -> Poll<Option<()>> {
        let mut fired = false;
        loop {
            let interval = self.interval;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            match timer.as_mut().poll(cx) {
                // Re-armed and polled on the next turn, so the waker is registered.
                Poll::Ready(()) => {
                    self.timer = None;
                    fired = true;
                }
                Poll::Pending if fired => return Poll::Ready(Some(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One task attempt to execute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptJob {
    pub workflow: String,
    pub run_id: i64,
    pub task: String,
    pub attempt: u32,
    pub attempt_id: i64,
    /// Not to start before (a retry's back-off), by the orchestrator's clock.
    pub not_before: Option<DateTime<Utc>>,
}

impl AttemptJob {
    pub fn new(workflow: &str, attempt: &TaskAttempt) -> AttemptJob {
        AttemptJob {
            workflow: workflow.to_string(),
            run_id: attempt.run_id.0,
            task: attempt.task.clone(),
            attempt: attempt.attempt,
            attempt_id: attempt.id.0,
            not_before: attempt.scheduled_at,
        }
    }
}

impl Job for AttemptJob {
    const QUEUE: &'static str = "lambda_ctl_task_attempts";
    const WHAT: &'static str = "task attempt";

    fn key(&self) -> String {
        format!("{}/{}/{}", self.run_id, self.task, self.attempt)
    }
}

/// Handles one job; an error means "could not even record the outcome" (apalis delivers the
/// job again, a few times).
pub type Handler<J = AttemptJob> =
    Arc<dyn Fn(J) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

pub enum Queue<J: Job = AttemptJob> {
    Sqlite(SqliteStorage<J>),
    Postgres(PostgresStorage<J>),
}

impl<J: Job> Clone for Queue<J> {
    fn clone(&self) -> Self {
        match self {
            Queue::Sqlite(s) => Queue::Sqlite(s.clone()),
            Queue::Postgres(s) => Queue::Postgres(s.clone()),
        }
    }
}

impl<J: Job> std::fmt::Debug for Queue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Queue::Sqlite(_) => "Queue(sqlite)",
            Queue::Postgres(_) => "Queue(postgres)",
        })
    }
}

impl<J: Job> Queue<J> {
    /// The queue in the state DB, its tables created or migrated first.
    pub async fn open(state: &State) -> anyhow::Result<Queue<J>> {
        match state.pool() {
            Pool::Sqlite(pool) => {
                // Not `SqliteStorage::setup`: it also sets `synchronous = OFF` on the shared
                // pool, which the archive manifest must not get.
                let mut migrator = SqliteStorage::<()>::migrations();
                migrator.dangerous_set_table_name(SQLITE_MIGRATIONS_TABLE);
                // Processes starting together race to apply the same migration; the loser
                // finds it applied on a second look.
                let mut tries = 0;
                loop {
                    match migrator.run(&pool).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            debug!(error = %e, "job queue migration raced another process; retrying");
                            tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                        }
                        Err(e) => {
                            return Err(e).context("creating the job queue tables (apalis-sqlite)");
                        }
                    }
                }
                let config = apalis_sqlite::Config::default()
                    .queue(J::QUEUE)
                    .heartbeat_interval(HEARTBEAT)
                    .missed_heartbeats(MISSED_HEARTBEATS)
                    .batch_size(1);
                Ok(Queue::Sqlite(SqliteStorage::new(&pool).with_config(config)))
            }
            Pool::Postgres(pool) => {
                PostgresStorage::setup(&pool)
                    .await
                    .context("creating the job queue tables (apalis-postgres, schema `apalis`)")?;
                let config = apalis_postgres::Config::default()
                    .queue(J::QUEUE)
                    .heartbeat_interval(HEARTBEAT)
                    .missed_heartbeats(MISSED_HEARTBEATS)
                    .batch_size(1);
                Ok(Queue::Postgres(
                    PostgresStorage::new(&pool).with_config(config),
                ))
            }
        }
    }

    /// Pushes the job, to start `delay` from now. A job with the same key already in the queue
    /// (done or not) makes this a no-op.
    pub async fn push(&self, job: J, delay: Duration) -> anyhow::Result<()> {
        let key = job.key();
        let task = TaskBuilder::new(job)
            .idempotency_key(&key)
            .max_attempts(DELIVERIES)
            .run_at_time(SystemTime::now() + delay)
            .build();
        let pushed = match self {
            // apalis-sqlite inserts with ON CONFLICT DO NOTHING: a duplicate is silently kept.
            Queue::Sqlite(s) => s
                .clone()
                .push_task(task)
                .await
                .map_err(|e| anyhow::anyhow!("{e}")),
            Queue::Postgres(s) => match s.clone().push_task(task).await {
                Ok(()) => Ok(()),
                // apalis-postgres lets the unique index on the key reject a duplicate.
                Err(TaskSinkError::PushError(apalis_postgres::Error::Database(
                    sqlx::Error::Database(e),
                ))) if e.is_unique_violation() => {
                    debug!(job = %key, "{} already queued", J::WHAT);
                    return Ok(());
                }
                Err(e) => Err(anyhow::anyhow!("{e}")),
            },
        };
        pushed.with_context(|| format!("queueing {} {key}", J::WHAT))?;
        debug!(job = %key, "queued {}", J::WHAT);
        Ok(())
    }

    /// Runs `concurrency` jobs at a time through `handler` until `shutdown`.
    pub async fn work(
        &self,
        name: String,
        concurrency: usize,
        handler: Handler<J>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let service = move |job: J| {
            let handler = handler.clone();
            async move {
                handler(job).await.map_err(|e| {
                    warn!(error = %format!("{e:#}"), "{} could not be recorded; the queue will deliver it again", J::WHAT);
                    BoxDynError::from(format!("{e:#}"))
                })
            }
        };
        let stop = async move {
            shutdown.cancelled().await;
            Ok::<(), std::io::Error>(())
        };
        let result = match self {
            Queue::Sqlite(s) => {
                WorkerBuilder::new(name)
                    .backend(s.clone().poll_with_strategy(Every::new(J::POLL)))
                    .concurrency(concurrency)
                    .build(service)
                    .run_until(stop)
                    .await
            }
            Queue::Postgres(s) => {
                WorkerBuilder::new(name)
                    .backend(s.clone().poll_with_strategy(Every::new(J::POLL)))
                    .concurrency(concurrency)
                    .build(service)
                    .run_until(stop)
                    .await
            }
        };
        result.map_err(|e| anyhow::anyhow!("job queue worker failed: {e}"))
    }
}
