//! `lambda-ctl run PIPELINE [--wait] [--views a,b]`: recompute a pipeline's views now, in this
//! process (a running server picks the publication up within a second), and `verify PIPELINE`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::CliError;
use super::serve::redact;
use crate::batch::{self, BatchError, Progress};
use crate::lake::Lake;
use crate::orchestration::fanout;
use crate::plan::Plan;
use crate::spec::Project;
use crate::state::State;

pub fn run(project_dir: &Path, name: &str, wait: bool, views: &[String]) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let plan = compile(&project, name)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (db, lake) = open(&project).await?;
        let views = (!views.is_empty()).then_some(views);
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut bar_shown = false;
        let mut progress = |p: &Progress| match p {
            Progress::Started {
                run_id,
                segments,
                rows,
            } => {
                // The id first, on stdout, so scripts can read it.
                println!("{run_id}");
                if wait {
                    eprintln!(
                        "run {run_id}: {segments} sealed segment(s), {rows} events in the cutoff"
                    );
                }
            }
            Progress::Segments {
                view,
                done,
                total,
                rows,
            } if wait && tty => {
                eprint!(
                    "\r{view}: segments {done}/{total}, {rows} events, {:.1}s   ",
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
                bar_shown = true;
            }
            Progress::Segments { .. } => {}
            Progress::Published {
                view,
                mode,
                segments,
                rows,
                partial_rows,
            } if wait => {
                if bar_shown {
                    eprintln!();
                    bar_shown = false;
                }
                eprintln!(
                    "{view}: published ({}, {segments} segment(s), {rows} events, {partial_rows} groups) at {:.1}s",
                    mode.as_str(),
                    started.elapsed().as_secs_f64()
                );
            }
            Progress::Published { .. } => {}
        };
        let project = Arc::new(project.clone());
        let result = fanout::recompute(
            &project,
            Arc::new(plan),
            &db,
            &lake,
            views,
            fanout::Help::AfterAMoment,
            &mut progress,
        )
        .await;
        db.close().await;
        match result {
            Ok(summary) => {
                if wait {
                    eprintln!(
                        "run {} succeeded in {:.2}s",
                        summary.run_id,
                        summary.elapsed.as_secs_f64()
                    );
                }
                Ok(())
            }
            Err(e @ BatchError::UnknownView { .. }) => Err(CliError::User(e.to_string())),
            Err(e) => Err(CliError::User(format!("run failed: {e}"))),
        }
    })
}

pub fn verify(project_dir: &Path, name: &str) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let plan = compile(&project, name)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (db, lake) = open(&project).await?;
        let report = batch::verify::verify(Arc::new(plan), &db, &lake).await;
        db.close().await;
        let report = report.context("verifying")?;
        println!(
            "{} sealed segment(s), {} events",
            report.segments, report.events
        );
        for v in &report.views {
            if v.differences.is_empty() {
                println!("{}: ok ({} rows agree)", v.view, v.rows);
            } else {
                println!("{}: DIFFERS", v.view);
                for d in &v.differences {
                    println!("  {d}");
                }
            }
        }
        if report.ok() {
            Ok(())
        } else {
            Err(CliError::User(
                "the batch and speed engines disagree".to_string(),
            ))
        }
    })
}

fn compile(project: &Project, name: &str) -> Result<Plan, CliError> {
    let Some(p) = project.pipeline(name) else {
        let known: Vec<&str> = project.pipelines.iter().map(|p| p.name.as_str()).collect();
        return Err(CliError::User(format!(
            "`{name}` is not a pipeline of this project (pipelines: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    Ok(Plan::compile(p).with_context(|| format!("compiling pipeline `{name}`"))?)
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?)
}

/// The project's state DB and lake.
pub(super) async fn open(project: &Project) -> Result<(State, Lake), CliError> {
    let s = &project.settings;
    let db = State::open(&s.state)
        .await
        .with_context(|| format!("opening the state DB {}", redact(&s.state)))?;
    let lake = Lake::open(&s.lake, &s.lake_options)
        .with_context(|| format!("opening the lake {}", s.lake))?;
    Ok((db, lake))
}
