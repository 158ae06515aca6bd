//! What happens next in a workflow: the pure decision behind every transaction on its runs.
//!
//! Given the running runs with their attempts, and the queued runs, [`decide`] returns the
//! changes that bring them forward: retry failed attempts after their back-off, mark tasks whose
//! needs failed as `upstream_failed`, queue tasks whose needs all succeeded, finish runs whose
//! tasks all ended, and start queued runs while fewer than `max_active_runs` are running.
//!
//! It looks only at the snapshot, so running it again on the same state changes nothing: the
//! recovery sweep can call it at any time.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::spec::{Task, Workflow};
use crate::state::{Outcome, Run, RunState, TaskAttempt, WorkflowChange, WorkflowSnapshot};

/// Where a task of a run stands, from its latest attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No attempt yet.
    Pending,
    /// An attempt is queued or running.
    Active,
    Succeeded,
    /// Failed with no retry left (or cancelled): its dependants cannot run.
    Failed,
    UpstreamFailed,
}

impl Status {
    fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::UpstreamFailed
        )
    }
}

/// The delay before attempt `next` (2, 3, …) of a task: `retry_delay`, doubled for each retry
/// after the first.
pub fn backoff(task: &Task, next: u32) -> chrono::Duration {
    let doublings = next.saturating_sub(2).min(30);
    let delay = task.retry_delay.saturating_mul(1u32 << doublings);
    chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
}

pub fn decide(
    workflow: &Workflow,
    snapshot: &WorkflowSnapshot,
    now: DateTime<Utc>,
) -> Vec<WorkflowChange> {
    let mut changes = Vec::new();
    let mut still_running = 0u32;
    for (run, attempts) in &snapshot.running {
        if !advance_run(workflow, run, attempts, now, &mut changes) {
            still_running += 1;
        }
    }
    let free = workflow.max_active_runs.saturating_sub(still_running) as usize;
    for run in snapshot.queued.iter().take(free) {
        changes.push(WorkflowChange::StartRun(run.id));
        changes.push(WorkflowChange::Log {
            run: run.id,
            line: "run started".into(),
        });
        advance_run(workflow, run, &[], now, &mut changes);
    }
    changes
}

/// Appends the changes for one running run; returns whether it finishes with them.
fn advance_run(
    workflow: &Workflow,
    run: &Run,
    attempts: &[TaskAttempt],
    now: DateTime<Utc>,
    changes: &mut Vec<WorkflowChange>,
) -> bool {
    let latest = latest_attempts(attempts);
    let mut status: BTreeMap<&str, Status> = BTreeMap::new();
    for task in &workflow.tasks {
        let s = match latest.get(task.name.as_str()) {
            None => Status::Pending,
            Some(a) => match a.state {
                RunState::Queued | RunState::Running => Status::Active,
                RunState::Succeeded => Status::Succeeded,
                RunState::UpstreamFailed => Status::UpstreamFailed,
                RunState::Failed | RunState::Cancelled if a.attempt <= task.retries => {
                    let next = a.attempt + 1;
                    let base = a.finished_at.unwrap_or(now);
                    let at = base + backoff(task, next);
                    changes.push(WorkflowChange::QueueAttempt {
                        run: run.id,
                        task: task.name.clone(),
                        scheduled_at: Some(at),
                    });
                    changes.push(WorkflowChange::Log {
                        run: run.id,
                        line: format!(
                            "task {} attempt {} failed; attempt {next} of {} at {}",
                            task.name,
                            a.attempt,
                            task.retries + 1,
                            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    });
                    Status::Active
                }
                RunState::Failed | RunState::Cancelled => Status::Failed,
            },
        };
        status.insert(task.name.as_str(), s);
    }

    // Pending tasks in dependency order, so a failure propagates down a whole chain at once.
    for task in topological(workflow) {
        if status[task.name.as_str()] != Status::Pending {
            continue;
        }
        let needs: Vec<(&str, Status)> = task
            .needs
            .iter()
            .map(|n| {
                (
                    n.as_str(),
                    status.get(n.as_str()).copied().unwrap_or(Status::Pending),
                )
            })
            .collect();
        if let Some((failed, _)) = needs
            .iter()
            .find(|(_, s)| matches!(s, Status::Failed | Status::UpstreamFailed))
        {
            changes.push(WorkflowChange::SkipTask {
                run: run.id,
                task: task.name.clone(),
                error: format!("upstream task `{failed}` failed"),
            });
            status.insert(task.name.as_str(), Status::UpstreamFailed);
        } else if needs.iter().all(|(_, s)| *s == Status::Succeeded) {
            changes.push(WorkflowChange::QueueAttempt {
                run: run.id,
                task: task.name.clone(),
                scheduled_at: None,
            });
            status.insert(task.name.as_str(), Status::Active);
        }
    }

    if !status.values().all(|s| s.is_terminal()) {
        return false;
    }
    let failed: Vec<String> = workflow
        .tasks
        .iter()
        .filter(|t| status[t.name.as_str()] == Status::Failed)
        .map(
            |t| match latest.get(t.name.as_str()).and_then(|a| a.error.as_deref()) {
                Some(e) => format!("task `{}` failed: {e}", t.name),
                None => format!("task `{}` failed", t.name),
            },
        )
        .collect();
    let (outcome, error) = if failed.is_empty() {
        (Outcome::Succeeded, None)
    } else {
        (Outcome::Failed, Some(failed.join("; ")))
    };
    changes.push(WorkflowChange::FinishRun {
        run: run.id,
        outcome,
        error: error.clone(),
    });
    changes.push(WorkflowChange::Log {
        run: run.id,
        line: match &error {
            None => "run succeeded".into(),
            Some(e) => format!("run failed: {e}"),
        },
    });
    true
}

fn latest_attempts(attempts: &[TaskAttempt]) -> BTreeMap<&str, &TaskAttempt> {
    let mut latest: BTreeMap<&str, &TaskAttempt> = BTreeMap::new();
    for a in attempts {
        let slot = latest.entry(a.task.as_str()).or_insert(a);
        if a.attempt > slot.attempt {
            *slot = a;
        }
    }
    latest
}

/// The tasks with every task before the ones that need it (validation rejects cycles; a task
/// left in a cycle regardless is never queued).
fn topological(workflow: &Workflow) -> Vec<&Task> {
    let mut done: Vec<&str> = Vec::new();
    let mut order = Vec::new();
    loop {
        let before = order.len();
        for t in &workflow.tasks {
            if !done.contains(&t.name.as_str())
                && t.needs.iter().all(|n| done.contains(&n.as_str()))
            {
                done.push(t.name.as_str());
                order.push(t);
            }
        }
        if order.len() == before {
            return order;
        }
    }
}
