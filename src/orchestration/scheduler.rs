//! The scheduler: turns due schedule slots into runs, and sweeps up after crashed processes.
//!
//! Only one process schedules at a time (PostgreSQL: an advisory lock; a standby takes over
//! within a second or two of the holder's death). Slots come from the state DB — the last
//! scheduled slot per workflow — never from memory, so a restart or a takeover neither loses
//! nor repeats one: each slot is claimed with a compare-and-set on that last slot, in the same
//! transaction that creates its run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Core, slots};
use crate::spec::Workflow;
use crate::state::{Outcome, SchedulerLock, WorkflowEvent};

/// How often a standby checks whether it can take over, and the leader checks it still leads.
const LEADER_CHECK: Duration = Duration::from_secs(1);
/// How often the leader reconciles every workflow and looks for lost or unqueued attempts.
const SWEEP: Duration = Duration::from_secs(5);
/// A running attempt without a heartbeat for this long is presumed dead with its process.
pub(crate) const LOST_AFTER: Duration = Duration::from_secs(30);
/// A queued attempt this old is pushed to the queue again (a no-op if the job exists), in case
/// the process that queued it died between its commit and the push.
const REQUEUE_AFTER: Duration = Duration::from_secs(15);
/// At most this many catch-up slots of one workflow per pass, so one workflow with a dense
/// schedule after a long outage cannot starve the others.
const MAX_SLOTS_PER_PASS: usize = 1000;

pub(crate) async fn run(core: Arc<Core>, shutdown: CancellationToken) {
    let mut lock: Option<SchedulerLock> = None;
    let mut next_sweep = Instant::now();
    while !shutdown.is_cancelled() {
        match lock.as_mut() {
            None => match core.state.try_scheduler_lock().await {
                Ok(Some(l)) => {
                    info!(worker = %core.worker_name, "this process is now the active scheduler");
                    lock = Some(l);
                    next_sweep = Instant::now();
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "cannot take the scheduler lock"),
            },
            Some(l) => {
                if !l.is_held().await {
                    warn!("lost the scheduler lock (state DB connection broke); standing by");
                    lock = None;
                }
            }
        }
        let mut wake: Option<DateTime<Utc>> = None;
        if lock.is_some() {
            wake = fire_due_slots(&core).await;
            if Instant::now() >= next_sweep {
                sweep(&core).await;
                next_sweep = Instant::now() + SWEEP;
            }
        }
        let slot = async {
            match wake {
                Some(at) => core.clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = slot => {}
            () = tokio::time::sleep(LEADER_CHECK) => {}
            () = shutdown.cancelled() => {}
        }
    }
    if let Some(l) = lock {
        l.release().await;
        info!("released the scheduler lock");
    }
}

/// Claims every due slot of every scheduled workflow; returns when the next one falls due.
async fn fire_due_slots(core: &Arc<Core>) -> Option<DateTime<Utc>> {
    let mut earliest: Option<DateTime<Utc>> = None;
    for workflow in &core.project.workflows {
        match fire_workflow(core, workflow).await {
            Ok(Some(next)) => earliest = Some(earliest.map_or(next, |e| e.min(next))),
            Ok(None) => {}
            Err(e) => {
                warn!(workflow = %workflow.name, error = %format!("{e:#}"), "cannot schedule workflow")
            }
        }
    }
    earliest
}

async fn fire_workflow(
    core: &Arc<Core>,
    workflow: &Workflow,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let Some(schedule) = &workflow.schedule else {
        return Ok(None);
    };
    let tz = workflow.timezone;
    let now = core.clock.now();
    let last = match core.state.last_slot(&workflow.name).await? {
        Some(last) => last,
        None => {
            // First sight of this workflow: slots from now on are owed, earlier ones are not.
            core.state.init_schedule(&workflow.name, now).await?;
            match core.state.last_slot(&workflow.name).await? {
                Some(last) => last,
                None => return Ok(slots::next(schedule, tz, now)),
            }
        }
    };
    let due: Vec<DateTime<Utc>> = if workflow.catchup {
        slots::between(schedule, tz, last, now)
            .take(MAX_SLOTS_PER_PASS)
            .collect()
    } else {
        slots::latest_between(schedule, tz, last, now)
            .into_iter()
            .collect()
    };
    let mut previous = last;
    let mut created = 0usize;
    for slot in due {
        match core
            .state
            .claim_slot(&workflow.name, Some(previous), slot)
            .await?
        {
            Some(run) => {
                info!(workflow = %workflow.name, run = run.id.0, slot = %slot, "scheduled run");
                previous = slot;
                created += 1;
            }
            // Another scheduler moved the slot on (only during a takeover): re-read next pass.
            None => break,
        }
    }
    if created > 0 {
        core.advance(workflow, WorkflowEvent::Reconcile).await?;
    }
    Ok(slots::next(schedule, tz, previous))
}

/// Recovery after crashed processes: admit and queue what a dead process left undone, fail
/// attempts whose worker died, and re-push queued attempts that may have no job.
async fn sweep(core: &Arc<Core>) {
    for workflow in &core.project.workflows {
        if let Err(e) = core.advance(workflow, WorkflowEvent::Reconcile).await {
            warn!(workflow = %workflow.name, error = %format!("{e:#}"), "cannot reconcile workflow");
        }
    }
    let lost_before = Utc::now() - chrono::Duration::from_std(LOST_AFTER).unwrap_or_default();
    match core.state.stale_task_attempts(lost_before).await {
        Ok(stale) => {
            for w in stale {
                let Some(workflow) = core.project.workflow(&w.workflow) else {
                    continue;
                };
                warn!(workflow = %w.workflow, run = w.attempt.run_id.0, task = %w.attempt.task, attempt = w.attempt.attempt, "task attempt lost: its worker stopped sending heartbeats");
                let event = WorkflowEvent::AttemptFinished {
                    attempt: w.attempt.id,
                    outcome: Outcome::Failed,
                    error: Some(format!(
                        "lost: its worker sent no heartbeat for {}s (process died?)",
                        LOST_AFTER.as_secs()
                    )),
                };
                if let Err(e) = core.advance(workflow, event).await {
                    warn!(error = %format!("{e:#}"), "cannot fail a lost task attempt");
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot look for lost task attempts"),
    }
    let requeue_before = Utc::now() - chrono::Duration::from_std(REQUEUE_AFTER).unwrap_or_default();
    match core.state.waiting_task_attempts(requeue_before).await {
        Ok(waiting) => {
            for w in waiting {
                if let Err(e) = core
                    .enqueue(&w.workflow, std::slice::from_ref(&w.attempt))
                    .await
                {
                    warn!(error = %format!("{e:#}"), "cannot re-queue a task attempt");
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot look for queued task attempts"),
    }
}
