//! `lambda-ctl worker`: task workers only, for scale-out (many machines, one PostgreSQL
//! state); with `--schedule` it also competes for the scheduler role, as `serve` does.
//! Also the orchestration plumbing the other workflow commands share.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::lake::Lake;
use crate::orchestration::fanout::{Groups, Help};
use crate::orchestration::layers::Layers;
use crate::orchestration::{Options, OrchestrationError, Orchestrator};
use crate::spec::Project;
use crate::state::State;

pub fn run(project_dir: &Path, concurrency: usize, schedule: bool) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    runtime()?.block_on(async {
        let (groups, state, lake) = open_groups(&project).await?;
        // Its batch tasks' jobs go to its own batch job worker below (and the others').
        let orchestrator = orchestrator(project.clone(), Help::No).await?;
        let shutdown = CancellationToken::new();
        let running = orchestrator.start(
            &Options {
                scheduler: schedule,
                concurrency,
            },
            shutdown.clone(),
        );
        // The jobs of scaled-out batch runs, as many at a time as task attempts.
        let working = groups.work(
            Arc::new(project),
            state,
            lake,
            format!("lambda-ctl-worker:{}", std::process::id()),
            concurrency.max(1),
            shutdown.clone(),
        );
        tracing::info!(concurrency, scheduler = schedule, "worker started");
        // Scripts and tests wait for this line.
        println!("lambda-ctl worker started");
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
        running.join().await;
        let _ = working.await;
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
    orchestrator(project, Help::AfterAMoment).await
}

/// [`open`], its scaled-out batch tasks' process helping with their jobs as `help` says.
async fn orchestrator(project: Project, help: Help) -> Result<Orchestrator, CliError> {
    let (state, lake) = super::run::open(&project).await?;
    let project = Arc::new(project);
    let layers = Arc::new(Layers::new(project.clone(), state.clone(), lake).helping(help));
    let orchestrator = Orchestrator::open(project, state, layers)
        .await
        .context("opening the job queue")?;
    Ok(orchestrator)
}

/// The batch job queue of the project's state DB, with the state DB and the lake.
async fn open_groups(project: &Project) -> Result<(Groups, State, Lake), CliError> {
    let (state, lake) = super::run::open(project).await?;
    let groups = Groups::open(&state)
        .await
        .context("opening the batch job queue")?;
    Ok((groups, state, lake))
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
