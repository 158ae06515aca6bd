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
                    // `now`, not the attempt's finish time: the back-off is waited on the
                    // orchestrator's clock, and the retry is decided in the transaction that
                    // records the failure, so the two are the same moment.
                    let at = now + backoff(task, next);
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use chrono::TimeZone;

    use super::*;
    use crate::spec::TaskKind;
    use crate::state::{AttemptId, RunId, RunKind};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn task(name: &str, needs: &[&str], retries: u32) -> Task {
        Task {
            name: name.into(),
            kind: TaskKind::Command {
                argv: vec!["true".into()],
            },
            needs: needs.iter().map(|n| n.to_string()).collect(),
            retries,
            retry_delay: Duration::from_secs(30),
            timeout: None,
        }
    }

    fn workflow(tasks: Vec<Task>, max_active_runs: u32) -> Workflow {
        Workflow {
            name: "wf".into(),
            description: None,
            file: PathBuf::from("workflows/wf.yaml"),
            schedule: None,
            timezone: chrono_tz::UTC,
            catchup: false,
            max_active_runs,
            tasks,
        }
    }

    fn run(id: i64, state: RunState) -> Run {
        Run {
            id: RunId(id),
            kind: RunKind::Workflow,
            name: "wf".into(),
            state,
            scheduled_at: None,
            created_at: t0(),
            started_at: None,
            finished_at: None,
            error: None,
            log: String::new(),
        }
    }

    fn attempt(run: i64, task: &str, n: u32, state: RunState) -> TaskAttempt {
        TaskAttempt {
            id: AttemptId(i64::from(n) * 100 + run),
            run_id: RunId(run),
            task: task.into(),
            attempt: n,
            state,
            scheduled_at: None,
            created_at: t0(),
            started_at: Some(t0()),
            finished_at: state.is_finished().then(t0),
            error: (state == RunState::Failed).then(|| "boom".to_string()),
            log: String::new(),
        }
    }

    fn without_logs(changes: Vec<WorkflowChange>) -> Vec<WorkflowChange> {
        changes
            .into_iter()
            .filter(|c| !matches!(c, WorkflowChange::Log { .. }))
            .collect()
    }

    fn queue(run: i64, task: &str, at: Option<DateTime<Utc>>) -> WorkflowChange {
        WorkflowChange::QueueAttempt {
            run: RunId(run),
            task: task.into(),
            scheduled_at: at,
        }
    }

    #[test]
    fn admission_fills_free_places_oldest_first_with_root_tasks() {
        let wf = workflow(
            vec![task("a", &[], 0), task("b", &["a"], 0), task("c", &[], 0)],
            2,
        );
        let snapshot = WorkflowSnapshot {
            running: vec![(
                run(1, RunState::Running),
                vec![
                    attempt(1, "a", 1, RunState::Running),
                    attempt(1, "c", 1, RunState::Queued),
                ],
            )],
            queued: vec![run(2, RunState::Queued), run(3, RunState::Queued)],
        };
        assert_eq!(
            without_logs(decide(&wf, &snapshot, t0())),
            vec![
                WorkflowChange::StartRun(RunId(2)),
                queue(2, "a", None),
                queue(2, "c", None),
            ]
        );
    }

    #[test]
    fn a_finishing_run_frees_its_place_in_the_same_decision() {
        let wf = workflow(vec![task("a", &[], 0)], 1);
        let snapshot = WorkflowSnapshot {
            running: vec![(
                run(1, RunState::Running),
                vec![attempt(1, "a", 1, RunState::Succeeded)],
            )],
            queued: vec![run(2, RunState::Queued)],
        };
        assert_eq!(
            without_logs(decide(&wf, &snapshot, t0())),
            vec![
                WorkflowChange::FinishRun {
                    run: RunId(1),
                    outcome: Outcome::Succeeded,
                    error: None
                },
                WorkflowChange::StartRun(RunId(2)),
                queue(2, "a", None),
            ]
        );
    }

    #[test]
    fn retries_back_off_exponentially_from_the_failure() {
        let wf = workflow(vec![task("a", &[], 3)], 1);
        for (n, delay) in [(1, 30), (2, 60), (3, 120)] {
            let attempts: Vec<TaskAttempt> = (1..=n)
                .map(|k| attempt(1, "a", k, RunState::Failed))
                .collect();
            let snapshot = WorkflowSnapshot {
                running: vec![(run(1, RunState::Running), attempts)],
                queued: vec![],
            };
            assert_eq!(
                without_logs(decide(&wf, &snapshot, t0())),
                vec![queue(1, "a", Some(t0() + chrono::Duration::seconds(delay)))],
                "after attempt {n}"
            );
        }
    }

    #[test]
    fn a_failure_without_retries_left_skips_the_whole_chain_and_fails_the_run() {
        let wf = workflow(
            vec![
                task("a", &[], 1),
                task("c", &["b"], 0),
                task("b", &["a"], 0),
                task("d", &[], 0),
            ],
            1,
        );
        let snapshot = WorkflowSnapshot {
            running: vec![(
                run(1, RunState::Running),
                vec![
                    attempt(1, "a", 1, RunState::Failed),
                    attempt(1, "a", 2, RunState::Failed),
                    attempt(1, "d", 1, RunState::Succeeded),
                ],
            )],
            queued: vec![],
        };
        let skip = |t: &str, why: &str| WorkflowChange::SkipTask {
            run: RunId(1),
            task: t.into(),
            error: format!("upstream task `{why}` failed"),
        };
        assert_eq!(
            without_logs(decide(&wf, &snapshot, t0())),
            vec![
                skip("b", "a"),
                skip("c", "b"),
                WorkflowChange::FinishRun {
                    run: RunId(1),
                    outcome: Outcome::Failed,
                    error: Some("task `a` failed: boom".into())
                },
            ]
        );
    }

    #[test]
    fn a_task_waits_for_every_need() {
        let wf = workflow(
            vec![
                task("a", &[], 0),
                task("b", &[], 0),
                task("c", &["a", "b"], 0),
            ],
            1,
        );
        let mut attempts = vec![
            attempt(1, "a", 1, RunState::Succeeded),
            attempt(1, "b", 1, RunState::Running),
        ];
        let snapshot = |attempts: &Vec<TaskAttempt>| WorkflowSnapshot {
            running: vec![(run(1, RunState::Running), attempts.clone())],
            queued: vec![],
        };
        assert_eq!(decide(&wf, &snapshot(&attempts), t0()), vec![]);
        attempts[1].state = RunState::Succeeded;
        assert_eq!(
            without_logs(decide(&wf, &snapshot(&attempts), t0())),
            vec![queue(1, "c", None)]
        );
    }
}
