//! Executing a task attempt taken from the queue: claim it, run it under its timeout while
//! sending heartbeats, record the outcome and let the workflow move on.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Core;
use super::queue::AttemptJob;
use super::tasks::{self, TaskContext, TaskLog};
use crate::state::{AttemptId, Outcome, StateError, TaskAttempt, WorkflowEvent};

/// How often a running attempt tells the state DB its worker is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a cancelled task gets to stop before its future is dropped.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) async fn handle(
    core: Arc<Core>,
    job: AttemptJob,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(at) = job.not_before {
        tokio::select! {
            () = core.clock.sleep_until(at) => {}
            // Not started, so nothing to record: the job is delivered again after a restart
            // (apalis re-queues a stopped worker's jobs) or re-pushed by the sweep.
            () = shutdown.cancelled() => anyhow::bail!("worker shutting down before the attempt's start time"),
        }
    }
    let attempt = match core
        .state
        .start_task_attempt(AttemptId(job.attempt_id))
        .await
    {
        Ok(a) => a,
        Err(StateError::WrongState { state, .. }) => {
            debug!(attempt = job.attempt_id, %state, "task attempt already taken; job ignored");
            return Ok(());
        }
        Err(StateError::AttemptNotFound(_)) => {
            warn!(
                attempt = job.attempt_id,
                "job for an unknown task attempt ignored"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let (outcome, error) = run_attempt(&core, &job, &attempt, &shutdown).await;
    match &error {
        None => {
            info!(workflow = %job.workflow, run = job.run_id, task = %job.task, attempt = job.attempt, "task succeeded")
        }
        Some(e) => {
            warn!(workflow = %job.workflow, run = job.run_id, task = %job.task, attempt = job.attempt, error = %e, "task failed")
        }
    }
    let Some(workflow) = core.project.workflow(&job.workflow) else {
        // Only reachable when the spec lost the workflow after the run was queued.
        core.state
            .finish_task_attempt(attempt.id, outcome, error.as_deref())
            .await?;
        return Ok(());
    };
    let event = WorkflowEvent::AttemptFinished {
        attempt: attempt.id,
        outcome,
        error,
    };
    let advanced = core.advance(workflow, event).await?;
    if !advanced.event_applied {
        warn!(
            attempt = attempt.id.0,
            "task attempt was ended elsewhere meanwhile (presumed lost); its result is discarded"
        );
    }
    Ok(())
}

/// Runs the attempt; returns how it ended and why it failed.
async fn run_attempt(
    core: &Arc<Core>,
    job: &AttemptJob,
    attempt: &TaskAttempt,
    shutdown: &CancellationToken,
) -> (Outcome, Option<String>) {
    let run = match core.state.run(attempt.run_id).await {
        Ok(Some(run)) => run,
        Ok(None) => {
            return (
                Outcome::Failed,
                Some(format!("run {} does not exist", attempt.run_id)),
            );
        }
        Err(e) => {
            return (
                Outcome::Failed,
                Some(format!("cannot read run {}: {e}", attempt.run_id)),
            );
        }
    };
    let Some(task) = core
        .project
        .workflow(&job.workflow)
        .and_then(|w| w.task(&attempt.task))
    else {
        return (
            Outcome::Failed,
            Some(format!(
                "workflow `{}` has no task `{}` in this worker's project (was the spec changed?)",
                job.workflow, attempt.task
            )),
        );
    };

    let (log, writer) = TaskLog::open(core.state.clone(), attempt.id);
    let cancel = shutdown.child_token();
    let ctx = TaskContext {
        run_id: run.id,
        workflow: job.workflow.clone(),
        task: task.name.clone(),
        attempt: attempt.attempt,
        scheduled_at: run.scheduled_at.unwrap_or(run.created_at),
        project_root: core.project.root.clone(),
        log: log.clone(),
        cancel: cancel.clone(),
    };
    log.line(format!(
        "--- {} attempt {} on {} ({})",
        task.name,
        attempt.attempt,
        core.worker_name,
        task.kind.kind()
    ));

    let timeout = async {
        match task.timeout {
            Some(t) => core.clock.sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let heartbeat = async {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            match core.state.heartbeat_task_attempt(attempt.id).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => warn!(attempt = attempt.id.0, error = %e, "cannot send a task heartbeat"),
            }
        }
    };
    let result: Result<(), String> = {
        let exec = tasks::execute(&task.kind, &ctx, &core.runner);
        tokio::pin!(exec);
        tokio::select! {
            r = &mut exec => r.map_err(|e| format!("{e:#}")),
            () = timeout => {
                cancel.cancel();
                let _ = tokio::time::timeout(STOP_GRACE, &mut exec).await;
                let t = task.timeout.unwrap_or_default();
                Err(format!("timed out after {}", crate::spec::duration::format(t)))
            }
            () = heartbeat => {
                cancel.cancel();
                let _ = tokio::time::timeout(STOP_GRACE, &mut exec).await;
                Err("stopped: the attempt was ended elsewhere (no heartbeat reached the state DB)".into())
            }
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(STOP_GRACE, &mut exec).await;
                Err("interrupted: the worker shut down".into())
            }
        }
    };
    if let Err(e) = &result {
        log.line(format!("--- failed: {e}"));
    } else {
        log.line("--- succeeded");
    }
    drop(ctx);
    drop(log);
    writer.finish().await;
    match result {
        Ok(()) => (Outcome::Succeeded, None),
        Err(e) => (Outcome::Failed, Some(e)),
    }
}
