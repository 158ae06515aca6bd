//! `lambda-ctl run PIPELINE [--wait] [--views a,b] [--full] [--refresh-lookups]`: recompute a
//! pipeline's views now (a running server picks the publication up within a second), and
//! `verify PIPELINE`.
//!
//! With `--wait` the run happens in this process, which shows its progress and exits with its
//! outcome. Without, this process starts a background `lambda-ctl run --detached` (in its own
//! process group, so it outlives this one and the terminal's Ctrl-C), prints the run id it
//! reports once the run exists, and returns; the run's outcome is in `lambda-ctl runs`/`logs`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use super::CliError;
use super::serve::redact;
use super::worker::runtime;
use crate::batch::{self, BatchError, Progress, Select};
use crate::lake::Lake;
use crate::orchestration::fanout;
use crate::plan::Plan;
use crate::spec::Project;
use crate::speed::lookups::Lookups;
use crate::state::State;

/// `run PIPELINE` of the loaded `project` (in `project_dir`).
pub fn pipeline(
    project_dir: &Path,
    project: Project,
    name: &str,
    (wait, detached): (bool, bool),
    select: Select<'_>,
    refresh_lookups: bool,
) -> Result<(), CliError> {
    let plan = compile(&project, name)?;
    if !wait && !detached {
        return detach(project_dir, name, select, refresh_lookups);
    }
    let rt = runtime()?;
    rt.block_on(async {
        let (db, lake) = open(&project).await?;
        // `--refresh-lookups`: the tables as their sources hold them now, each a version in
        // the lake before the run records it. A source that cannot be read fails the run:
        // history is never restated with a table that is not the current one.
        let current = if refresh_lookups {
            let lookups = Lookups::new(
                Arc::new(plan.pipeline().clone()),
                lake.clone(),
                project.settings.lake_options.clone(),
            );
            Some(
                lookups
                    .read_sources()
                    .await
                    .map_err(|e| CliError::User(format!("--refresh-lookups: {e:#}")))?,
            )
        } else {
            None
        };
        // `--candidate`: the views whose definition differs from the version served.
        let changed = match (select.candidate, select.views) {
            (true, None) => Some(changed_views(&plan, &db, name).await?),
            _ => None,
        };
        let select = Select {
            lookups: current.as_ref(),
            views: changed.as_deref().or(select.views),
            ..select
        };
        let started = Instant::now();
        // Segments read, as a bar on a terminal only (indicatif draws nothing on a pipe); the
        // lines around it are printed either way.
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} segments, {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        let mut progress = |p: &Progress| match p {
            Progress::Started {
                run_id,
                segments,
                rows,
            } => {
                // The id first, on stdout, so scripts (and `detach`) can read it. Nothing else
                // goes there: a detached run's stdout is closed once the id is read.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{run_id}").and_then(|()| out.flush());
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
            } if wait => {
                bar.set_message(format!("{view}: {rows} events"));
                bar.set_length(*total as u64);
                bar.set_position(*done as u64);
            }
            _ => {
                if let Some(line) = p.published_line().filter(|_| wait) {
                    let at = started.elapsed().as_secs_f64();
                    bar.suspend(|| eprintln!("{line} at {at:.1}s"));
                }
            }
        };
        let project = Arc::new(project.clone());
        let result = fanout::recompute(
            &project,
            Arc::new(plan),
            &db,
            &lake,
            select,
            fanout::Help::AfterAMoment,
            &mut progress,
        )
        .await;
        bar.finish_and_clear();
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

/// The views of `plan` whose definition differs from their current publication's (or that
/// have none): what `run --candidate` computes. A user error when there are none.
async fn changed_views(plan: &Plan, db: &State, pipeline: &str) -> Result<Vec<String>, CliError> {
    let mut changed = Vec::new();
    for (i, v) in plan.pipeline().views.iter().enumerate() {
        let current = db
            .current_publication(pipeline, &v.name)
            .await
            .context("reading the current publications")?;
        if current.is_none_or(|c| c.logic_hash != plan.logic_hash(i)) {
            changed.push(v.name.clone());
        }
    }
    if changed.is_empty() {
        return Err(CliError::User(format!(
            "every view of `{pipeline}` is served as pipelines/ defines it: no candidate to compute (edit a view, or name views with --views)"
        )));
    }
    Ok(changed)
}

/// Runs the recompute in a background `lambda-ctl run --detached` and prints its run id;
/// fails with the background process's message if it ends before the run exists.
fn detach(
    project_dir: &Path,
    name: &str,
    select: Select<'_>,
    refresh_lookups: bool,
) -> Result<(), CliError> {
    use std::io::{BufRead, Read, Seek};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().context("locating the lambda-ctl binary")?;
    // Its stderr goes to a file nobody else can open (unlinked at once): read here only if it
    // fails before the run exists; afterwards the run's log is in the state DB.
    let path = std::env::temp_dir().join(format!(
        "lambda-ctl-run-{}-{}.log",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let mut log = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let mut cmd = Command::new(exe);
    cmd.arg("--project")
        .arg(project_dir)
        .args(["run", name, "--detached"]);
    if let Some(views) = select.views {
        cmd.arg("--views").arg(views.join(","));
    }
    if select.full {
        cmd.arg("--full");
    }
    if refresh_lookups {
        cmd.arg("--refresh-lookups");
    }
    if select.candidate {
        cmd.arg("--candidate");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().context("sharing the log file")?)
        .process_group(0)
        .spawn()
        .context("starting the background run")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        // EOF without a line: it ended before the run existed.
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if let Ok(id) = line.trim().parse::<i64>() {
        println!("{id}");
        return Ok(());
    }
    let status = child.wait().context("waiting for the background run")?;
    let mut text = String::new();
    let _ = log.rewind().and_then(|()| log.read_to_string(&mut text));
    let text = text.trim();
    Err(CliError::User(if text.is_empty() {
        format!("the run did not start (background process: {status})")
    } else {
        text.to_string()
    }))
}

pub fn verify(project_dir: &Path, name: &str, sample: crate::spec::Sample) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let plan = compile(&project, name)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (db, lake) = open(&project).await?;
        let report = batch::verify::verify(Arc::new(plan), &db, &lake, sample).await;
        let recorded = match &report {
            Ok(r) => Some(batch::verify::record(&db, name, None, r).await),
            Err(_) => None,
        };
        db.close().await;
        let report = report.context("verifying")?;
        recorded.transpose().context("recording the result")?;
        println!(
            "{} of {} sealed segment(s), {} events",
            report.segments, report.sealed, report.events
        );
        if report.damaged.is_empty() {
            println!("archive: ok");
        } else {
            println!("archive: {} DAMAGED segment(s)", report.damaged.len());
            for d in &report.damaged {
                println!("  {d}");
            }
        }
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
        match report.verdict() {
            None => Ok(()),
            Some(verdict) => Err(CliError::User(verdict)),
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
