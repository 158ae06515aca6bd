//! Workflow runs as a whole (DESIGN.md §6): the transaction that moves a workflow's runs
//! forward, attempt heartbeats, the recovery sweeps, and the scheduler's leadership lock.
//!
//! Every change to a workflow's runs goes through [`State::advance_workflow`]: it locks the
//! workflow (a row in `workflow_locks`, written first), applies one event, reads the active runs
//! and their attempts, lets the caller decide what follows (start runs, queue attempts, skip
//! tasks, finish runs), and applies that — all in one transaction. The decision itself lives in
//! `orchestration`; this module only guarantees that two processes never decide on the same
//! workflow at once, which is what makes `max_active_runs` and "start a task once" hold across
//! processes.

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Connection;

use super::runs::{AttemptRow, RunRow};
use super::{
    AttemptId, BeginWrite, Outcome, Run, RunId, RunState, State, StateError, TaskAttempt, db, now,
};

/// Everything [`State::advance_workflow`]'s decision sees, read inside its transaction.
#[derive(Debug, Clone, Default)]
pub struct WorkflowSnapshot {
    /// Running runs, oldest first, each with every attempt of every task (oldest first).
    pub running: Vec<(Run, Vec<TaskAttempt>)>,
    /// Queued runs waiting for a free `max_active_runs` place, oldest first (at most the
    /// `queued_limit` given to [`State::advance_workflow`]).
    pub queued: Vec<Run>,
}

/// What happened before the decision; applied first, in the same transaction.
#[derive(Debug, Clone)]
pub enum WorkflowEvent {
    /// Nothing: just reconcile (admit queued runs, queue ready tasks, finish finished runs).
    Reconcile,
    /// A queued or running attempt ended.
    AttemptFinished {
        attempt: AttemptId,
        outcome: Outcome,
        error: Option<String>,
    },
}

/// One step decided for a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkflowChange {
    /// `queued → running`.
    StartRun(RunId),
    FinishRun {
        run: RunId,
        outcome: Outcome,
        error: Option<String>,
    },
    /// Queues the task's next attempt, to start at `scheduled_at` (a retry's back-off) or at
    /// once.
    QueueAttempt {
        run: RunId,
        task: String,
        scheduled_at: Option<DateTime<Utc>>,
    },
    /// Records that the task will not run because a task it needs failed: one attempt in
    /// `upstream_failed`.
    SkipTask {
        run: RunId,
        task: String,
        error: String,
    },
    /// Appends a line to the run's log.
    Log { run: RunId, line: String },
}

/// What [`State::advance_workflow`] did.
#[derive(Debug, Clone, Default)]
pub struct Advanced {
    /// Whether the event changed anything: `false` for an attempt that had already ended (a
    /// duplicate delivery, or a lost attempt whose worker came back).
    pub event_applied: bool,
    /// Attempts queued by the decision; the caller hands them to the job queue.
    pub queued: Vec<TaskAttempt>,
    pub started: Vec<RunId>,
    pub finished: Vec<Run>,
}

/// An attempt with the workflow its run belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowAttempt {
    pub workflow: String,
    pub attempt: TaskAttempt,
}

const RUN_COLUMNS: &str = "r.id, r.kind, r.name, r.state, r.scheduled_at, r.created_at, r.started_at, r.finished_at, r.error, r.log";
const ATTEMPT_COLUMNS: &str = "a.id, a.run_id, a.task, a.attempt, a.state, a.scheduled_at, \
     a.created_at, a.started_at, a.finished_at, a.error, a.log";

const LOCK_WORKFLOW: &str = "
    INSERT INTO workflow_locks (workflow, locked_at) VALUES ($1, $2)
    ON CONFLICT (workflow) DO UPDATE SET locked_at = excluded.locked_at";
const FINISH_ATTEMPT: &str = "
    UPDATE task_attempts SET state = $2, finished_at = $3, error = $4
    WHERE id = $1 AND state IN ('queued', 'running')";
const START_RUN: &str =
    "UPDATE runs SET state = 'running', started_at = $2 WHERE id = $1 AND state = 'queued'";
const FINISH_RUN: &str = "
    UPDATE runs SET state = $2, finished_at = $3, error = $4
    WHERE id = $1 AND state IN ('queued', 'running')";
const APPEND_RUN_LOG: &str = "UPDATE runs SET log = log || $2 WHERE id = $1";
const HEARTBEAT: &str =
    "UPDATE task_attempts SET heartbeat_at = $2 WHERE id = $1 AND state = 'running'";
const INIT_SCHEDULE: &str = "
    INSERT INTO schedules (workflow, last_slot, updated_at) VALUES ($1, $2, $3)
    ON CONFLICT (workflow) DO NOTHING";
/// Session-level advisory lock key of the scheduler ("lambdasc" in ASCII).
const SCHEDULER_LOCK_KEY: i64 = 0x6c61_6d62_6461_7363;

fn select_runs(state: &str, limit: bool) -> String {
    format!(
        "SELECT {RUN_COLUMNS} FROM runs r WHERE r.kind = 'workflow' AND r.name = $1 \
         AND r.state = '{state}' ORDER BY r.id{}",
        if limit { " LIMIT $2" } else { "" }
    )
}

fn select_running_attempts() -> String {
    format!(
        "SELECT {ATTEMPT_COLUMNS} FROM task_attempts a JOIN runs r ON r.id = a.run_id \
         WHERE r.kind = 'workflow' AND r.name = $1 AND r.state = 'running' ORDER BY a.id"
    )
}

/// The next attempt number is computed in the INSERT; UNIQUE (run_id, task, attempt) turns a
/// concurrent duplicate into an error instead of two attempts with one number.
fn insert_attempt(state: RunState) -> String {
    let finished = if state.is_finished() { "$4" } else { "NULL" };
    format!(
        "INSERT INTO task_attempts (run_id, task, attempt, state, scheduled_at, created_at, \
         finished_at, error) \
         SELECT $1, $2, COALESCE(MAX(attempt), 0) + 1, '{}', $3, $4, {finished}, $5 \
         FROM task_attempts WHERE run_id = $1 AND task = $2 \
         RETURNING id, run_id, task, attempt, state, scheduled_at, created_at, started_at, \
         finished_at, error, log",
        state.as_str()
    )
}

fn select_workflow_attempts(condition: &str) -> String {
    format!(
        "SELECT r.name AS workflow, {ATTEMPT_COLUMNS} FROM task_attempts a \
         JOIN runs r ON r.id = a.run_id \
         WHERE r.kind = 'workflow' AND r.state = 'running' AND {condition} ORDER BY a.id LIMIT 1000"
    )
}

#[derive(sqlx::FromRow)]
struct WorkflowAttemptRow {
    workflow: String,
    #[sqlx(flatten)]
    attempt: AttemptRow,
}

impl State {
    /// Applies `event` to `workflow`, then the changes `decide` returns for the snapshot read
    /// after it, in one transaction serialised with every other one on the same workflow.
    ///
    /// `decide` must be pure: it runs inside the transaction (keep it short) and its input is
    /// already consistent. Changes that no longer apply (a run already started or finished) are
    /// skipped, so a decision can never move a run backwards.
    pub async fn advance_workflow<F>(
        &self,
        workflow: &str,
        event: WorkflowEvent,
        queued_limit: u32,
        decide: F,
    ) -> Result<Advanced, StateError>
    where
        F: FnOnce(&WorkflowSnapshot) -> Vec<WorkflowChange>,
    {
        let at = now();
        let running_sql = select_runs("running", false);
        let queued_sql = select_runs("queued", true);
        let attempts_sql = select_running_attempts();
        let queue_sql = insert_attempt(RunState::Queued);
        let skip_sql = insert_attempt(RunState::UpstreamFailed);
        on_pool!(self, |pool| {
            let op = "advance workflow";
            let mut tx = pool.begin_write().await.map_err(db(op))?;
            sqlx::query(LOCK_WORKFLOW)
                .bind(workflow)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(db(op))?;
            let mut advanced = Advanced::default();
            match &event {
                WorkflowEvent::Reconcile => advanced.event_applied = true,
                WorkflowEvent::AttemptFinished {
                    attempt,
                    outcome,
                    error,
                } => {
                    let changed = sqlx::query(FINISH_ATTEMPT)
                        .bind(attempt.0)
                        .bind(RunState::from(*outcome).as_str())
                        .bind(at)
                        .bind(error.as_deref())
                        .execute(&mut *tx)
                        .await
                        .map_err(db(op))?
                        .rows_affected();
                    advanced.event_applied = changed > 0;
                }
            }

            let running: Vec<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(running_sql))
                .bind(workflow)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(op))?;
            let queued: Vec<RunRow> = sqlx::query_as(sqlx::AssertSqlSafe(queued_sql))
                .bind(workflow)
                .bind(i64::from(queued_limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(db(op))?;
            let attempts: Vec<AttemptRow> = sqlx::query_as(sqlx::AssertSqlSafe(attempts_sql))
                .bind(workflow)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(op))?;
            let snapshot = snapshot(running, queued, attempts)?;

            for change in decide(&snapshot) {
                match change {
                    WorkflowChange::StartRun(run) => {
                        let changed = sqlx::query(START_RUN)
                            .bind(run.0)
                            .bind(at)
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op))?
                            .rows_affected();
                        if changed > 0 {
                            advanced.started.push(run);
                        }
                    }
                    WorkflowChange::FinishRun {
                        run,
                        outcome,
                        error,
                    } => {
                        let changed = sqlx::query(FINISH_RUN)
                            .bind(run.0)
                            .bind(RunState::from(outcome).as_str())
                            .bind(at)
                            .bind(error)
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op))?
                            .rows_affected();
                        if changed > 0 {
                            let row: RunRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                                "SELECT {RUN_COLUMNS} FROM runs r WHERE r.id = $1"
                            )))
                            .bind(run.0)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(db(op))?;
                            advanced.finished.push(row.into_run()?);
                        }
                    }
                    WorkflowChange::QueueAttempt {
                        run,
                        task,
                        scheduled_at,
                    } => {
                        let row: AttemptRow =
                            sqlx::query_as(sqlx::AssertSqlSafe(queue_sql.clone()))
                                .bind(run.0)
                                .bind(task)
                                .bind(scheduled_at)
                                .bind(at)
                                .bind(None::<String>)
                                .fetch_one(&mut *tx)
                                .await
                                .map_err(db(op))?;
                        advanced.queued.push(row.into_attempt()?);
                    }
                    WorkflowChange::SkipTask { run, task, error } => {
                        sqlx::query(sqlx::AssertSqlSafe(skip_sql.clone()))
                            .bind(run.0)
                            .bind(task)
                            .bind(None::<DateTime<Utc>>)
                            .bind(at)
                            .bind(error)
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op))?;
                    }
                    WorkflowChange::Log { run, line } => {
                        sqlx::query(APPEND_RUN_LOG)
                            .bind(run.0)
                            .bind(format!("{} {line}\n", at.format("%Y-%m-%dT%H:%M:%S%.3fZ")))
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op))?;
                    }
                }
            }
            tx.commit().await.map_err(db("advance workflow: commit"))?;
            Ok(advanced)
        })
    }

    /// Records that the attempt's worker is alive. Returns `false` when the attempt is no
    /// longer running (it was failed as lost meanwhile: the worker should stop it).
    pub async fn heartbeat_task_attempt(&self, id: AttemptId) -> Result<bool, StateError> {
        let changed = on_pool!(self, |pool| sqlx::query(HEARTBEAT)
            .bind(id.0)
            .bind(now())
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .map_err(db("heartbeat task attempt"))?;
        Ok(changed > 0)
    }

    /// Running attempts of running workflow runs whose worker has not sent a heartbeat since
    /// `before` (or never did, and started before it): their process is presumed dead.
    pub async fn stale_task_attempts(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Vec<WorkflowAttempt>, StateError> {
        let sql = select_workflow_attempts(
            "a.state = 'running' AND COALESCE(a.heartbeat_at, a.started_at, a.created_at) < $1",
        );
        self.workflow_attempts(sql, before, "list stale task attempts")
            .await
    }

    /// Queued attempts of running workflow runs created before `before`: the sweep hands them
    /// to the job queue again in case the process that queued them died before it could (the
    /// queue ignores a job it already holds).
    pub async fn waiting_task_attempts(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Vec<WorkflowAttempt>, StateError> {
        let sql = select_workflow_attempts("a.state = 'queued' AND a.created_at < $1");
        self.workflow_attempts(sql, before, "list queued task attempts")
            .await
    }

    async fn workflow_attempts(
        &self,
        sql: String,
        before: DateTime<Utc>,
        op: &'static str,
    ) -> Result<Vec<WorkflowAttempt>, StateError> {
        let rows: Vec<WorkflowAttemptRow> =
            on_pool!(self, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(before)
                .fetch_all(pool)
                .await)
            .map_err(db(op))?;
        rows.into_iter()
            .map(|r| {
                Ok(WorkflowAttempt {
                    workflow: r.workflow,
                    attempt: r.attempt.into_attempt()?,
                })
            })
            .collect()
    }

    /// Records `baseline` as the last slot of a workflow that has none yet, without creating a
    /// run: slots after it are owed. Does nothing when the workflow already has a last slot.
    /// Kept to the microsecond like every slot: [`State::claim_slot`] compares the last slot
    /// at that precision, and a baseline with nanoseconds stored as is (SQLite's text) would
    /// never compare equal — the schedule would never fire.
    pub async fn init_schedule(
        &self,
        workflow: &str,
        baseline: DateTime<Utc>,
    ) -> Result<(), StateError> {
        on_pool!(self, |pool| sqlx::query(INIT_SCHEDULE)
            .bind(workflow)
            .bind(baseline.trunc_subsecs(6))
            .bind(now())
            .execute(pool)
            .await
            .map(drop))
        .map_err(db("initialise schedule"))?;
        Ok(())
    }

    /// Tries to become the one active scheduler. On PostgreSQL this takes a session-level
    /// advisory lock on a connection of its own, held until the [`SchedulerLock`] is dropped or
    /// its process dies (the server then ends the session and frees the lock). Returns `None`
    /// while another process holds it. A SQLite state lives on one machine and slot claims are
    /// compare-and-set, so every SQLite caller gets the lock.
    pub async fn try_scheduler_lock(&self) -> Result<Option<SchedulerLock>, StateError> {
        match &self.db {
            super::Db::Sqlite(_) => Ok(Some(SchedulerLock { conn: None })),
            super::Db::Postgres(pool) => {
                let op = "take the scheduler lock";
                let mut conn = pool.acquire().await.map_err(db(op))?.detach();
                let (held,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(SCHEDULER_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(db(op))?;
                if held {
                    Ok(Some(SchedulerLock { conn: Some(conn) }))
                } else {
                    // Closing the session also drops any half-taken state; nothing to unlock.
                    let _ = conn.close().await;
                    Ok(None)
                }
            }
        }
    }
}

/// Held by the active scheduler; see [`State::try_scheduler_lock`].
#[derive(Debug)]
pub struct SchedulerLock {
    /// The PostgreSQL session that holds the advisory lock; the lock lives exactly as long as
    /// this connection.
    conn: Option<sqlx::PgConnection>,
}

impl SchedulerLock {
    /// Whether the lock is still held: `false` once the session holding it broke (the server
    /// has then released it, and another process may hold it now).
    pub async fn is_held(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(conn) => conn.ping().await.is_ok(),
        }
    }

    /// Releases the lock now (a clean shutdown hands scheduling over without waiting).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(SCHEDULER_LOCK_KEY)
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

fn snapshot(
    running: Vec<RunRow>,
    queued: Vec<RunRow>,
    attempts: Vec<AttemptRow>,
) -> Result<WorkflowSnapshot, StateError> {
    let mut attempts: Vec<TaskAttempt> = attempts
        .into_iter()
        .map(AttemptRow::into_attempt)
        .collect::<Result<_, _>>()?;
    let mut out = WorkflowSnapshot::default();
    for row in running {
        let run = row.into_run()?;
        let (mine, rest): (Vec<_>, Vec<_>) = attempts.into_iter().partition(|a| a.run_id == run.id);
        attempts = rest;
        out.running.push((run, mine));
    }
    out.queued = queued
        .into_iter()
        .map(RunRow::into_run)
        .collect::<Result<_, _>>()?;
    Ok(out)
}
