//! `lambda-ctl run WORKFLOW [--wait]`: start a run now and print its id; with `--wait`, also
//! execute tasks in this process (so the run progresses even with no `serve` or `worker`
//! running), show the task states as they change, and exit with the run's outcome. A NAME that
//! is a pipeline goes to `run.rs` (recompute it now).

use std::io::Write;
use std::path::Path;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::CliError;
use super::worker::{open, runtime, user_or_internal, wait_for_signal};
use crate::orchestration::{Options, RunStatus};
use crate::state::RunState;

pub fn run(
    project_dir: &Path,
    name: &str,
    wait: bool,
    detached: bool,
    (views, full, refresh_lookups, candidate): (&[String], bool, bool, bool),
) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    if project.workflow(name).is_none() && project.pipeline(name).is_some() {
        let select = crate::batch::Select {
            views: (!views.is_empty()).then_some(views),
            full,
            lookups: None,
            history: project.settings.serve.history,
            candidate,
        };
        return super::run::pipeline(
            project_dir,
            project,
            name,
            (wait, detached),
            select,
            refresh_lookups,
        );
    }
    if (!views.is_empty() || full || refresh_lookups || candidate)
        && project.workflow(name).is_some()
    {
        let flag = if full {
            "--full"
        } else if refresh_lookups {
            "--refresh-lookups"
        } else if candidate {
            "--candidate"
        } else {
            "--views"
        };
        return Err(CliError::User(format!(
            "{flag} applies to a pipeline; `{name}` is a workflow (its `batch` tasks name their views)"
        )));
    }
    runtime()?.block_on(async {
        let orchestrator = open(project).await?;
        let id = orchestrator.trigger(name).await.map_err(user_or_internal)?;
        println!("{id}");
        if !wait {
            return Ok(());
        }
        let shutdown = CancellationToken::new();
        let running = orchestrator.start(
            &Options {
                scheduler: false,
                concurrency: 4,
            },
            shutdown.clone(),
        );
        let stop = shutdown.clone();
        let signal = tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
        });
        let mut screen = Screen::new();
        let result = orchestrator
            .wait(id, |status| screen.show(status), &shutdown)
            .await;
        shutdown.cancel();
        signal.abort();
        running.join().await;
        let status = result.map_err(|e| {
            CliError::User(format!(
                "{e:#}; run {id} goes on in any `lambda-ctl serve` or `worker` (see `lambda-ctl runs`)"
            ))
        })?;
        match status.run.state {
            RunState::Succeeded => Ok(()),
            state => Err(CliError::User(format!(
                "run {id} {state}: {}",
                status.run.error.as_deref().unwrap_or("no reason recorded")
            ))),
        }
    })
}

/// Task states on stderr (stdout carries only the run id, for scripts): one line each, redrawn
/// in place on a terminal (indicatif), one line per change otherwise.
struct Screen {
    /// On a terminal: the lines drawn, the run's first and then one per task.
    live: Option<(MultiProgress, Vec<ProgressBar>)>,
    /// Last printed state per task (not a terminal), to print only changes.
    printed: Vec<(String, String)>,
}

impl Screen {
    fn new() -> Screen {
        let multi = MultiProgress::new();
        Screen {
            live: (!multi.is_hidden()).then_some((multi, Vec::new())),
            printed: Vec::new(),
        }
    }

    fn show(&mut self, status: &RunStatus) {
        let lines: Vec<(String, String)> = std::iter::once((
            format!("run {}", status.run.id),
            status.run.state.to_string(),
        ))
        .chain(status.tasks.iter().map(|t| {
            let state = match t.state {
                None => "waiting".to_string(),
                Some(s) if t.attempts > 1 => format!("{s} (attempt {})", t.attempts),
                Some(s) => s.to_string(),
            };
            (format!("  {}", t.name), state)
        }))
        .collect();
        if let Some((multi, bars)) = &mut self.live {
            let width = lines.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            let style = ProgressStyle::with_template("{prefix}  {msg}").expect("a valid template");
            for (i, (name, state)) in lines.into_iter().enumerate() {
                if bars.len() == i {
                    bars.push(multi.add(ProgressBar::new_spinner().with_style(style.clone())));
                }
                bars[i].set_prefix(format!("{name:width$}"));
                bars[i].set_message(state);
            }
        } else {
            let mut out = std::io::stderr().lock();
            for (i, (name, state)) in lines.into_iter().enumerate() {
                let name = if i == 0 {
                    name
                } else {
                    format!("task {}", name.trim())
                };
                let line = (name, state);
                if !self.printed.contains(&line) {
                    let _ = writeln!(out, "{}: {}", line.0, line.1);
                    self.printed.retain(|(n, _)| *n != line.0);
                    self.printed.push(line);
                }
            }
            let _ = out.flush();
        }
    }
}
