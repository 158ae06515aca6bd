//! Read-only figures for operators (`lambda-ctl status`, `/metrics`): runs by state and the
//! finished task attempts of workflows. Nothing here writes.

use chrono::{DateTime, Utc};

use super::{RunKind, RunState, State, StateError, db, from_db};

/// How many runs of one workflow or pipeline are in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCount {
    pub kind: RunKind,
    /// The workflow, or the pipeline of a batch run.
    pub name: String,
    pub state: RunState,
    pub count: u64,
}

/// One task attempt of a workflow run, reduced to what the figures need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFigure {
    pub workflow: String,
    pub task: String,
    /// 1 for a first attempt; more is a retry.
    pub attempt: u32,
    pub state: RunState,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl AttemptFigure {
    /// Seconds from start to finish of an attempt that ran and ended.
    pub fn duration_seconds(&self) -> Option<f64> {
        let (s, f) = (self.started_at?, self.finished_at?);
        Some((f - s).num_microseconds()? as f64 / 1e6)
    }
}

#[derive(sqlx::FromRow)]
struct AttemptFigureRow {
    workflow: String,
    task: String,
    attempt: i64,
    state: String,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl State {
    /// Runs per (kind, name, state), ordered by kind and name.
    pub async fn run_counts(&self) -> Result<Vec<RunCount>, StateError> {
        const SQL: &str = "
            SELECT kind, name, state, COUNT(*) FROM runs
            GROUP BY kind, name, state ORDER BY kind, name, state";
        let rows: Vec<(String, String, String, i64)> =
            on_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await)
                .map_err(db("count runs"))?;
        rows.into_iter()
            .map(|(kind, name, state, n)| {
                Ok(RunCount {
                    kind: kind.parse()?,
                    name,
                    state: state.parse()?,
                    count: from_db("run count", n)?,
                })
            })
            .collect()
    }

    /// Every task attempt of every workflow run, oldest first.
    pub async fn attempt_figures(&self) -> Result<Vec<AttemptFigure>, StateError> {
        const SQL: &str = "
            SELECT r.name AS workflow, a.task, a.attempt, a.state, a.started_at, a.finished_at
            FROM task_attempts a JOIN runs r ON r.id = a.run_id
            WHERE r.kind = 'workflow' ORDER BY a.id";
        let rows: Vec<AttemptFigureRow> =
            on_pool!(self, |pool| sqlx::query_as(SQL).fetch_all(pool).await)
                .map_err(db("list task attempts"))?;
        rows.into_iter()
            .map(|r| {
                Ok(AttemptFigure {
                    workflow: r.workflow,
                    task: r.task,
                    attempt: from_db("attempt number", r.attempt)?,
                    state: r.state.parse()?,
                    started_at: r.started_at,
                    finished_at: r.finished_at,
                })
            })
            .collect()
    }
}
