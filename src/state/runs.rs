//! Runs (a workflow run or a batch recompute) and the attempts of their tasks. Both share one
//! lifecycle, enforced by conditional UPDATEs so it holds across processes:
//! `queued → running → succeeded | failed | cancelled`, or `queued → failed | cancelled`.
//! A task that never ran because a task it needs failed is recorded as one attempt in
//! `upstream_failed` (see `state::workflows`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::{State, StateError, db, from_db, now};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(pub i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// A run of `workflows/NAME.yaml`; `name` is the workflow.
    Workflow,
    /// A recompute of a pipeline's views; `name` is the pipeline.
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Task attempts only: the task did not run because a task it needs failed.
    UpstreamFailed,
}

/// How a run or attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Workflow => "workflow",
            RunKind::Batch => "batch",
        }
    }
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::UpstreamFailed => "upstream_failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled | RunState::UpstreamFailed
        )
    }
}

impl From<Outcome> for RunState {
    fn from(o: Outcome) -> RunState {
        match o {
            Outcome::Succeeded => RunState::Succeeded,
            Outcome::Failed => RunState::Failed,
            Outcome::Cancelled => RunState::Cancelled,
        }
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunKind {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        match s {
            "workflow" => Ok(RunKind::Workflow),
            "batch" => Ok(RunKind::Batch),
            _ => Err(StateError::Corrupt {
                what: "run kind",
                value: s.into(),
            }),
        }
    }
}

impl FromStr for RunState {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        [
            RunState::Queued,
            RunState::Running,
            RunState::Succeeded,
            RunState::Failed,
            RunState::Cancelled,
            RunState::UpstreamFailed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| StateError::Corrupt {
            what: "run state",
            value: s.into(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: RunId,
    pub kind: RunKind,
    pub name: String,
    pub state: RunState,
    /// The schedule slot it runs for; `None` for a run started by hand.
    pub scheduled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub log: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAttempt {
    pub id: AttemptId,
    pub run_id: RunId,
    pub task: String,
    /// 1 for the first attempt of a task in a run, then 2, 3, … for retries.
    pub attempt: u32,
    pub state: RunState,
    /// When a retry may start (after its back-off); `None` for "as soon as possible".
    pub scheduled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub log: String,
}

/// The columns of [`RunRow`], as a literal so `concat!` can build whole statements.
macro_rules! run_columns {
    () => {
        "id, kind, name, state, scheduled_at, created_at, started_at, finished_at, error, log"
    };
}

macro_rules! attempt_columns {
    () => {
        "id, run_id, task, attempt, state, scheduled_at, created_at, started_at, finished_at, \
         error, log"
    };
}

#[derive(sqlx::FromRow)]
pub(super) struct RunRow {
    id: i64,
    kind: String,
    name: String,
    state: String,
    scheduled_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    error: Option<String>,
    log: String,
}

impl RunRow {
    pub(super) fn into_run(self) -> Result<Run, StateError> {
        Ok(Run {
            id: RunId(self.id),
            kind: self.kind.parse()?,
            name: self.name,
            state: self.state.parse()?,
            scheduled_at: self.scheduled_at,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            log: self.log,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AttemptRow {
    id: i64,
    run_id: i64,
    task: String,
    attempt: i64,
    state: String,
    scheduled_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    error: Option<String>,
    log: String,
}

impl AttemptRow {
    pub(super) fn into_attempt(self) -> Result<TaskAttempt, StateError> {
        Ok(TaskAttempt {
            id: AttemptId(self.id),
            run_id: RunId(self.run_id),
            task: self.task,
            attempt: from_db("attempt number", self.attempt)?,
            state: self.state.parse()?,
            scheduled_at: self.scheduled_at,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            log: self.log,
        })
    }
}

/// Also used by the scheduler, inside its slot-claiming transaction.
pub(super) const INSERT_RUN: &str = concat!(
    "INSERT INTO runs (kind, name, state, scheduled_at, created_at) ",
    "VALUES ($1, $2, 'queued', $3, $4) RETURNING ",
    run_columns!()
);
const SELECT_RUN: &str = concat!("SELECT ", run_columns!(), " FROM runs WHERE id = $1");
const START_RUN: &str = concat!(
    "UPDATE runs SET state = 'running', started_at = $2 WHERE id = $1 AND state = 'queued' ",
    "RETURNING ",
    run_columns!()
);
const FINISH_RUN: &str = concat!(
    "UPDATE runs SET state = $2, finished_at = $3, error = $4 ",
    "WHERE id = $1 AND state IN ('queued', 'running') RETURNING ",
    run_columns!()
);
const APPEND_RUN_LOG: &str = "UPDATE runs SET log = log || $2 WHERE id = $1";
const LIST_RUNS: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE ($1 IS NULL OR name = $1) ORDER BY id DESC LIMIT $2"
);

/// The next attempt number is computed in the INSERT itself; UNIQUE (run_id, task, attempt)
/// turns a concurrent duplicate into an error instead of two attempts with one number.
const INSERT_ATTEMPT: &str = concat!(
    "INSERT INTO task_attempts (run_id, task, attempt, state, scheduled_at, created_at) ",
    "SELECT $1, $2, COALESCE(MAX(attempt), 0) + 1, 'queued', $3, $4 ",
    "FROM task_attempts WHERE run_id = $1 AND task = $2 RETURNING ",
    attempt_columns!()
);
const SELECT_ATTEMPT: &str = concat!(
    "SELECT ",
    attempt_columns!(),
    " FROM task_attempts WHERE id = $1"
);
const START_ATTEMPT: &str = concat!(
    "UPDATE task_attempts SET state = 'running', started_at = $2 ",
    "WHERE id = $1 AND state = 'queued' RETURNING ",
    attempt_columns!()
);
const FINISH_ATTEMPT: &str = concat!(
    "UPDATE task_attempts SET state = $2, finished_at = $3, error = $4 ",
    "WHERE id = $1 AND state IN ('queued', 'running') RETURNING ",
    attempt_columns!()
);
const APPEND_ATTEMPT_LOG: &str = "UPDATE task_attempts SET log = log || $2 WHERE id = $1";
const LIST_ATTEMPTS: &str = concat!(
    "SELECT ",
    attempt_columns!(),
    " FROM task_attempts WHERE run_id = $1 ORDER BY id"
);

/// What differs between the two tables that share the lifecycle: runs and task attempts.
trait Lifecycle: Sized {
    type Row: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + Send
        + Unpin;
    /// What one is called in errors.
    const WHAT: &'static str;
    const SELECT: &'static str;
    const START: &'static str;
    const FINISH: &'static str;
    const APPEND_LOG: &'static str;
    /// The operations as database errors name them: read, start, finish, append to the log.
    const OPS: [&'static str; 4];
    fn from_row(row: Self::Row) -> Result<Self, StateError>;
    fn state(&self) -> RunState;
    fn not_found(id: i64) -> StateError;
}

impl Lifecycle for Run {
    type Row = RunRow;
    const WHAT: &'static str = "run";
    const SELECT: &'static str = SELECT_RUN;
    const START: &'static str = START_RUN;
    const FINISH: &'static str = FINISH_RUN;
    const APPEND_LOG: &'static str = APPEND_RUN_LOG;
    const OPS: [&'static str; 4] = ["read run", "start run", "finish run", "append to run log"];
    fn from_row(row: RunRow) -> Result<Run, StateError> {
        row.into_run()
    }
    fn state(&self) -> RunState {
        self.state
    }
    fn not_found(id: i64) -> StateError {
        StateError::RunNotFound(RunId(id))
    }
}

impl Lifecycle for TaskAttempt {
    type Row = AttemptRow;
    const WHAT: &'static str = "task attempt";
    const SELECT: &'static str = SELECT_ATTEMPT;
    const START: &'static str = START_ATTEMPT;
    const FINISH: &'static str = FINISH_ATTEMPT;
    const APPEND_LOG: &'static str = APPEND_ATTEMPT_LOG;
    const OPS: [&'static str; 4] = [
        "read task attempt",
        "start task attempt",
        "finish task attempt",
        "append to task log",
    ];
    fn from_row(row: AttemptRow) -> Result<TaskAttempt, StateError> {
        row.into_attempt()
    }
    fn state(&self) -> RunState {
        self.state
    }
    fn not_found(id: i64) -> StateError {
        StateError::AttemptNotFound(AttemptId(id))
    }
}

/// A lifecycle step; a finish says how the run or attempt ended and, if it failed, why.
#[derive(Clone, Copy)]
enum Step<'a> {
    Start,
    Finish(Outcome, Option<&'a str>),
}

impl State {
    /// Creates a queued run. `scheduled_at` is the schedule slot, if any (the scheduler uses
    /// [`State::claim_slot`] instead, which also records the slot).
    pub async fn create_run(
        &self,
        kind: RunKind,
        name: &str,
        scheduled_at: Option<DateTime<Utc>>,
    ) -> Result<Run, StateError> {
        let row: RunRow = on_pool!(self, |pool| sqlx::query_as(INSERT_RUN)
            .bind(kind.as_str())
            .bind(name)
            .bind(scheduled_at)
            .bind(now())
            .fetch_one(pool)
            .await)
        .map_err(db("create run"))?;
        row.into_run()
    }

    pub async fn run(&self, id: RunId) -> Result<Option<Run>, StateError> {
        self.read(id.0).await
    }

    /// The newest runs first, of one workflow or pipeline (`name`) or of all.
    pub async fn runs(&self, name: Option<&str>, limit: u32) -> Result<Vec<Run>, StateError> {
        let rows: Vec<RunRow> = on_pool!(self, |pool| sqlx::query_as(LIST_RUNS)
            .bind(name)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
        .map_err(db("list runs"))?;
        rows.into_iter().map(RunRow::into_run).collect()
    }

    /// `queued → running`. Fails with [`StateError::WrongState`] for a run in any other state,
    /// so two workers cannot both start one run.
    pub async fn start_run(&self, id: RunId) -> Result<Run, StateError> {
        self.step(id.0, Step::Start).await
    }

    /// Ends a queued or running run; `error` says why it failed. Fails with
    /// [`StateError::WrongState`] if it has already ended.
    pub async fn finish_run(
        &self,
        id: RunId,
        outcome: Outcome,
        error: Option<&str>,
    ) -> Result<Run, StateError> {
        self.step(id.0, Step::Finish(outcome, error)).await
    }

    /// Appends `text` to the run's log (`lambda-ctl logs RUN_ID`).
    pub async fn append_run_log(&self, id: RunId, text: &str) -> Result<(), StateError> {
        self.append_log::<Run>(id.0, text).await
    }

    /// Creates the next attempt (1, 2, …) of `task` in run `run_id`, queued until
    /// `scheduled_at` (a retry's back-off) or at once when `None`.
    pub async fn create_task_attempt(
        &self,
        run_id: RunId,
        task: &str,
        scheduled_at: Option<DateTime<Utc>>,
    ) -> Result<TaskAttempt, StateError> {
        let row: Result<AttemptRow, sqlx::Error> =
            on_pool!(self, |pool| sqlx::query_as(INSERT_ATTEMPT)
                .bind(run_id.0)
                .bind(task)
                .bind(scheduled_at)
                .bind(now())
                .fetch_one(pool)
                .await);
        match row {
            Ok(row) => row.into_attempt(),
            Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
                Err(StateError::RunNotFound(run_id))
            }
            Err(e) => Err(db("create task attempt")(e)),
        }
    }

    /// `queued → running`, as for runs.
    pub async fn start_task_attempt(&self, id: AttemptId) -> Result<TaskAttempt, StateError> {
        self.step(id.0, Step::Start).await
    }

    /// Ends a queued or running attempt, as for runs.
    pub async fn finish_task_attempt(
        &self,
        id: AttemptId,
        outcome: Outcome,
        error: Option<&str>,
    ) -> Result<TaskAttempt, StateError> {
        self.step(id.0, Step::Finish(outcome, error)).await
    }

    pub async fn append_task_log(&self, id: AttemptId, text: &str) -> Result<(), StateError> {
        self.append_log::<TaskAttempt>(id.0, text).await
    }

    /// Every attempt of every task of a run, oldest first.
    pub async fn task_attempts(&self, run_id: RunId) -> Result<Vec<TaskAttempt>, StateError> {
        let rows: Vec<AttemptRow> = on_pool!(self, |pool| sqlx::query_as(LIST_ATTEMPTS)
            .bind(run_id.0)
            .fetch_all(pool)
            .await)
        .map_err(db("list task attempts"))?;
        rows.into_iter().map(AttemptRow::into_attempt).collect()
    }

    async fn read<L: Lifecycle>(&self, id: i64) -> Result<Option<L>, StateError> {
        let row: Option<L::Row> = on_pool!(self, |pool| sqlx::query_as(L::SELECT)
            .bind(id)
            .fetch_optional(pool)
            .await)
        .map_err(db(L::OPS[0]))?;
        row.map(L::from_row).transpose()
    }

    /// One lifecycle step (`queued → running`, or `queued | running → outcome`), or
    /// [`StateError::WrongState`] when the row is in no state to take it.
    async fn step<L: Lifecycle>(&self, id: i64, step: Step<'_>) -> Result<L, StateError> {
        let (sql, op, action) = match step {
            Step::Start => (L::START, L::OPS[1], "start it"),
            Step::Finish(..) => (L::FINISH, L::OPS[2], "finish it"),
        };
        let row: Option<L::Row> = on_pool!(self, |pool| {
            let query = sqlx::query_as(sql).bind(id);
            let query = match step {
                Step::Start => query.bind(now()),
                Step::Finish(outcome, error) => query
                    .bind(RunState::from(outcome).as_str())
                    .bind(now())
                    .bind(error),
            };
            query.fetch_optional(pool).await
        })
        .map_err(db(op))?;
        match row {
            Some(row) => L::from_row(row),
            None => Err(self.transition_error::<L>(id, action).await),
        }
    }

    async fn append_log<L: Lifecycle>(&self, id: i64, text: &str) -> Result<(), StateError> {
        let changed = on_pool!(self, |pool| sqlx::query(L::APPEND_LOG)
            .bind(id)
            .bind(text)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        .map_err(db(L::OPS[3]))?;
        if changed == 0 {
            return Err(L::not_found(id));
        }
        Ok(())
    }

    /// Why a lifecycle step changed nothing: the row is in another state, or missing.
    async fn transition_error<L: Lifecycle>(&self, id: i64, action: &'static str) -> StateError {
        match self.read::<L>(id).await {
            Ok(Some(row)) => StateError::WrongState {
                what: L::WHAT,
                id,
                state: row.state(),
                action,
            },
            Ok(None) => L::not_found(id),
            Err(e) => e,
        }
    }
}
