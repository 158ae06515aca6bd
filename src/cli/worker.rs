//! `lambda-ctl worker`: task workers only, for scale-out (many machines, one PostgreSQL
//! state); with `--schedule` it also competes for the scheduler role, as `serve` does.
//! Also the orchestration plumbing the other workflow commands share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::orchestration::{Options, OrchestrationError, Orchestrator, TaskContext, TaskRunner};
use crate::spec::Project;
use crate::state::State;

pub fn run(project_dir: &Path, concurrency: usize, schedule: bool) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    runtime()?.block_on(async {
        let orchestrator = open(project).await?;
        let shutdown = CancellationToken::new();
        let running = orchestrator.start(
            &Options {
                scheduler: schedule,
                concurrency,
            },
            shutdown.clone(),
        );
        tracing::info!(concurrency, scheduler = schedule, "worker started");
        // Scripts and tests wait for this line.
        println!("lambda-ctl worker started");
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
        running.join().await;
        Ok(())
    })
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?)
}

/// The project's orchestrator over its state DB.
pub(super) async fn open(project: Project) -> Result<Orchestrator, CliError> {
    let state = State::open(&project.settings.state)
        .await
        .context("opening the state DB")?;
    let orchestrator = Orchestrator::open(Arc::new(project), state, task_runner())
        .await
        .context("opening the job queue")?;
    Ok(orchestrator)
}

/// Orchestration errors the user can act on are user errors (exit 1).
pub(super) fn user_or_internal(e: OrchestrationError) -> CliError {
    match e {
        OrchestrationError::UnknownWorkflow { .. }
        | OrchestrationError::NotScheduled(_)
        | OrchestrationError::EmptyRange { .. }
        | OrchestrationError::TooManySlots { .. } => CliError::User(e.to_string()),
        OrchestrationError::State(_) | OrchestrationError::Queue(_) => {
            CliError::Internal(anyhow::Error::new(e))
        }
    }
}

/// The layers behind `batch`, `compact` and `retention` tasks.
fn task_runner() -> Arc<dyn TaskRunner> {
    Arc::new(LayersNotLinked)
}

/// Fails `batch`, `compact` and `retention` tasks with an explanation: this build links no
/// batch layer to run them (`command` tasks run regardless).
struct LayersNotLinked;

impl LayersNotLinked {
    fn fail<'a>(kind: &'static str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            anyhow::bail!(
                "`{kind}` tasks need the batch layer, which this lambda-ctl build does not include"
            )
        })
    }
}

impl TaskRunner for LayersNotLinked {
    fn batch<'a>(
        &'a self,
        _: &'a TaskContext,
        _: &'a str,
        _: Option<&'a [String]>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Self::fail("batch")
    }

    fn compact<'a>(&'a self, _: &'a TaskContext, _: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Self::fail("compact")
    }

    fn retention<'a>(
        &'a self,
        _: &'a TaskContext,
        _: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Self::fail("retention")
    }
}

/// Ctrl-C or SIGTERM.
pub(super) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
