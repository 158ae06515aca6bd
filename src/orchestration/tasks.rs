//! Executing one task attempt: the boundary to the layers that implement `batch`, `compact`,
//! `retention` and `verify` ([`TaskRunner`]), and `command` tasks, implemented here.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::spec::{Sample, TaskKind};
use crate::state::{AttemptId, RunId, State};

/// The layers' side of the task boundary: the batch layer recomputes views, the lake/archive
/// owners compact and expire segments. Orchestration only calls these; a returned error fails
/// the attempt (and is retried per the task's `retries`). Implementations should stop soon
/// after `ctx.cancel` fires (timeout or shutdown); the future is dropped a few seconds later
/// regardless.
pub trait TaskRunner: Send + Sync + 'static {
    fn batch<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        views: Option<&'a [String]>,
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    fn compact<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    fn retention<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        keep: Duration,
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Checks `sample` of the pipeline's archive and both engines over it, and records the
    /// result; fails when anything is wrong.
    fn verify<'a>(
        &'a self,
        ctx: &'a TaskContext,
        pipeline: &'a str,
        sample: Sample,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// What a task attempt knows about itself.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub run_id: RunId,
    pub workflow: String,
    pub task: String,
    pub attempt: u32,
    /// The schedule slot the run is for; for a run started by hand, when it was started.
    pub scheduled_at: DateTime<Utc>,
    /// The project directory: a command's working directory.
    pub project_root: PathBuf,
    /// The attempt's log (`lambda-ctl logs RUN_ID`).
    pub log: TaskLog,
    /// Fires when the attempt must stop: its timeout passed or the worker is shutting down.
    pub cancel: CancellationToken,
}

impl TaskContext {
    /// `LAMBDA_RUN_ID`, `LAMBDA_WORKFLOW`, `LAMBDA_SCHEDULED_AT`, as a command sees them.
    pub fn vars(&self) -> [(&'static str, String); 3] {
        [
            ("LAMBDA_RUN_ID", self.run_id.to_string()),
            ("LAMBDA_WORKFLOW", self.workflow.clone()),
            (
                "LAMBDA_SCHEDULED_AT",
                self.scheduled_at
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ),
        ]
    }
}

/// Runs one attempt of a task to its end.
pub async fn execute(
    kind: &TaskKind,
    ctx: &TaskContext,
    runner: &Arc<dyn TaskRunner>,
) -> anyhow::Result<()> {
    match kind {
        TaskKind::Batch { pipeline, views } => runner.batch(ctx, pipeline, views.as_deref()).await,
        TaskKind::Compact { pipeline } => runner.compact(ctx, pipeline).await,
        TaskKind::Retention { pipeline, keep } => runner.retention(ctx, pipeline, *keep).await,
        TaskKind::Verify { pipeline, sample } => runner.verify(ctx, pipeline, *sample).await,
        TaskKind::Command { argv } => command(ctx, argv).await,
    }
}

/// Replaces `${LAMBDA_RUN_ID}`, `${LAMBDA_WORKFLOW}` and `${LAMBDA_SCHEDULED_AT}` (left in
/// argv when the spec was loaded) with this attempt's values.
pub fn expand(arg: &str, vars: &[(&'static str, String)]) -> String {
    let mut out = arg.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    out
}

/// Runs `argv` in its own process group, so a timeout can kill everything it started; its
/// stdout and stderr become the attempt's log.
async fn command(ctx: &TaskContext, argv: &[String]) -> anyhow::Result<()> {
    let vars = ctx.vars();
    let argv: Vec<String> = argv.iter().map(|a| expand(a, &vars)).collect();
    let (program, args) = argv
        .split_first()
        .context("the command is empty (validation should have caught this)")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&ctx.project_root)
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start `{program}` (in {})",
            ctx.project_root.display()
        )
    })?;
    let pgid = child.id();
    let out = child.stdout.take().map(|s| pump(s, ctx.log.clone()));
    let err = child.stderr.take().map(|s| pump(s, ctx.log.clone()));

    let status = tokio::select! {
        status = child.wait() => status.context("waiting for the command")?,
        () = ctx.cancel.cancelled() => {
            if let Some(pgid) = pgid {
                kill_group(pgid);
            }
            let _ = child.wait().await;
            // Output of the killed processes is still worth keeping.
            for pump in [out, err].into_iter().flatten() {
                let _ = tokio::time::timeout(Duration::from_secs(1), pump).await;
            }
            anyhow::bail!("stopped: its process group was killed");
        }
    };
    // The group may hold processes that outlive the leader (daemonised children); they belong
    // to this attempt and end with it.
    if let Some(pgid) = pgid {
        kill_group(pgid);
    }
    for pump in [out, err].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    }
    if status.success() {
        Ok(())
    } else {
        match status.code() {
            Some(code) => anyhow::bail!("`{program}` exited with status {code}"),
            None => anyhow::bail!("`{program}` was killed by a signal"),
        }
    }
}

fn kill_group(pgid: u32) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        // ESRCH: the group is already gone.
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => warn!(pgid, error = %e, "cannot kill a command's process group"),
    }
}

fn pump(
    stream: impl AsyncRead + Unpin + Send + 'static,
    log: TaskLog,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.line(line);
        }
    })
}

/// Appends lines to an attempt's log in the state DB, batched so a chatty command does not
/// write once per line.
#[derive(Debug, Clone)]
pub struct TaskLog {
    tx: mpsc::UnboundedSender<String>,
}

/// Owns the writer task of a [`TaskLog`]; [`TaskLogWriter::finish`] flushes what is left.
pub struct TaskLogWriter {
    handle: tokio::task::JoinHandle<()>,
}

/// How long log lines may wait before they are written.
const LOG_FLUSH: Duration = Duration::from_millis(250);

impl TaskLog {
    pub fn open(state: State, attempt: AttemptId) -> (TaskLog, TaskLogWriter) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let handle = tokio::spawn(async move {
            let mut buf = String::new();
            loop {
                let more = tokio::select! {
                    line = rx.recv() => match line {
                        Some(line) => { buf.push_str(&line); buf.push('\n'); true }
                        None => false,
                    },
                    () = tokio::time::sleep(LOG_FLUSH), if !buf.is_empty() => true,
                };
                // Drain what is already there, then write once.
                while let Ok(line) = rx.try_recv() {
                    buf.push_str(&line);
                    buf.push('\n');
                }
                if !buf.is_empty()
                    && let Err(e) = state.append_task_log(attempt, &buf).await
                {
                    warn!(attempt = attempt.0, error = %e, "cannot write a task log");
                }
                buf.clear();
                if !more {
                    return;
                }
            }
        });
        (TaskLog { tx }, TaskLogWriter { handle })
    }

    pub fn line(&self, line: impl Into<String>) {
        // The writer only stops once every sender is gone, so this cannot be lost.
        let _ = self.tx.send(line.into());
    }
}

impl TaskLogWriter {
    /// Waits until every line sent before all [`TaskLog`] clones were dropped is written.
    pub async fn finish(self) {
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_variables_are_expanded() {
        let vars = [
            ("LAMBDA_RUN_ID", "42".to_string()),
            ("LAMBDA_WORKFLOW", "nightly".to_string()),
            ("LAMBDA_SCHEDULED_AT", "2026-03-29T01:00:00Z".to_string()),
        ];
        assert_eq!(
            expand(
                "--run=${LAMBDA_RUN_ID}/${LAMBDA_WORKFLOW}@${LAMBDA_SCHEDULED_AT}",
                &vars
            ),
            "--run=42/nightly@2026-03-29T01:00:00Z"
        );
        assert_eq!(expand("${HOME}", &vars), "${HOME}");
    }
}
