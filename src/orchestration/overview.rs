//! Where every workflow stands, for operators: next fire, last run, runs by state, task
//! durations and retries — read from the state DB, so `lambda-ctl status` works with no server
//! running, and `/metrics` of a server shows the same figures.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::slots;
use crate::spec::Workflow;
use crate::state::{Run, RunKind, RunState, State, StateError};
use crate::telemetry::{DURATION_BUCKETS, Exposition, HistogramSnapshot};

#[derive(Debug, Clone)]
pub struct WorkflowOverview {
    pub name: String,
    /// The cron expression as written; `None` for a workflow run only by hand.
    pub schedule: Option<String>,
    pub timezone: String,
    pub next_fire: Option<DateTime<Utc>>,
    pub last_run: Option<Run>,
    /// Runs per state (queued, running, succeeded, failed, cancelled), zeros included.
    pub runs: BTreeMap<&'static str, u64>,
    /// In the workflow's task order.
    pub tasks: Vec<TaskOverview>,
}

#[derive(Debug, Clone)]
pub struct TaskOverview {
    pub name: String,
    pub attempts: u64,
    /// Attempts after the first of a run.
    pub retries: u64,
    /// Of attempts that ran and finished.
    pub durations: HistogramSnapshot,
}

/// The run states a run can be in (task attempts also know `upstream_failed`).
const RUN_STATES: [RunState; 5] = [
    RunState::Queued,
    RunState::Running,
    RunState::Succeeded,
    RunState::Failed,
    RunState::Cancelled,
];

/// When a workflow fires next: the first slot after both its last claimed slot and `now`.
pub fn next_fire(
    wf: &Workflow,
    last_slot: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let schedule = wf.schedule.as_ref()?;
    let after = last_slot.map_or(now, |l| l.max(now));
    slots::next(schedule, wf.timezone, after)
}

/// Every workflow of the project, as of `now`.
pub async fn workflows(
    workflows: &[Workflow],
    state: &State,
    now: DateTime<Utc>,
) -> Result<Vec<WorkflowOverview>, StateError> {
    let counts = state.run_counts().await?;
    let attempts = state.attempt_figures().await?;
    let mut out = Vec::with_capacity(workflows.len());
    for wf in workflows {
        let mut runs: BTreeMap<&'static str, u64> =
            RUN_STATES.iter().map(|s| (s.as_str(), 0)).collect();
        for c in counts
            .iter()
            .filter(|c| c.kind == RunKind::Workflow && c.name == wf.name)
        {
            *runs.entry(c.state.as_str()).or_default() += c.count;
        }
        let tasks = wf
            .tasks
            .iter()
            .map(|t| {
                let mine: Vec<_> = attempts
                    .iter()
                    .filter(|a| a.workflow == wf.name && a.task == t.name)
                    .collect();
                TaskOverview {
                    name: t.name.clone(),
                    attempts: mine.len() as u64,
                    retries: mine.iter().filter(|a| a.attempt > 1).count() as u64,
                    durations: HistogramSnapshot::of_values(
                        DURATION_BUCKETS,
                        mine.iter()
                            .filter(|a| a.state.is_finished())
                            .filter_map(|a| a.duration_seconds()),
                    ),
                }
            })
            .collect();
        let last_slot = state.last_slot(&wf.name).await?;
        let last_run = state.runs(Some(&wf.name), 1).await?.into_iter().next();
        out.push(WorkflowOverview {
            name: wf.name.clone(),
            schedule: wf.schedule.as_ref().map(|s| s.expr.clone()),
            timezone: wf.timezone.name().to_string(),
            next_fire: next_fire(wf, last_slot, now),
            last_run,
            runs,
            tasks,
        });
    }
    Ok(out)
}

/// The workflow families of `/metrics`.
pub fn write_metrics(e: &mut Exposition, list: &[WorkflowOverview]) {
    for w in list {
        for (state, n) in &w.runs {
            e.gauge(
                "lambda_workflow_runs",
                "Runs of a workflow by their current state.",
                &[("workflow", w.name.as_str()), ("state", *state)],
                *n as f64,
            );
        }
    }
    for w in list {
        for t in &w.tasks {
            e.histogram(
                "lambda_workflow_task_duration_seconds",
                "Duration of finished task attempts.",
                &[("workflow", w.name.as_str()), ("task", t.name.as_str())],
                &t.durations,
            );
        }
    }
    for w in list {
        for t in &w.tasks {
            e.counter(
                "lambda_workflow_task_retries_total",
                "Task attempts that were retries (attempt number above 1).",
                &[("workflow", w.name.as_str()), ("task", t.name.as_str())],
                t.retries as f64,
            );
        }
    }
    for w in list {
        if let Some(next) = w.next_fire {
            e.gauge(
                "lambda_workflow_next_fire_timestamp_seconds",
                "When the workflow's schedule fires next (Unix time).",
                &[("workflow", w.name.as_str())],
                next.timestamp_millis() as f64 / 1000.0,
            );
        }
    }
}
