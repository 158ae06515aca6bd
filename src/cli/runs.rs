//! `lambda-ctl runs [WORKFLOW]`: run history, newest first.

use std::path::Path;

use chrono::{DateTime, Utc};

use super::CliError;
use super::worker::{open, runtime, user_or_internal};
use crate::state::Run;

pub fn run(project_dir: &Path, workflow: Option<&str>, limit: u32) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    if let Some(name) = workflow
        && project.workflow(name).is_none()
        && project.pipeline(name).is_none()
    {
        return Err(CliError::User(format!(
            "unknown workflow `{name}`{}",
            crate::spec::diag::did_you_mean(
                name,
                project.workflows.iter().map(|w| w.name.as_str())
            )
        )));
    }
    runtime()?.block_on(async {
        let orchestrator = open(project).await?;
        let runs = orchestrator
            .runs(workflow, limit)
            .await
            .map_err(user_or_internal)?;
        print!("{}", table(&runs));
        Ok(())
    })
}

/// An aligned table: ID, NAME, STATE, SLOT, STARTED, DURATION, ERROR.
pub(super) fn table(runs: &[Run]) -> String {
    let header = [
        "ID", "NAME", "STATE", "SLOT", "STARTED", "DURATION", "ERROR",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.state.to_string(),
                r.scheduled_at.map_or_else(|| "manual".into(), time),
                r.started_at.map_or_else(|| "-".into(), time),
                duration(r),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    aligned(&header, &rows)
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
pub(super) fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub(super) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn duration(r: &Run) -> String {
    let Some(start) = r.started_at else {
        return "-".into();
    };
    let end = r.finished_at.unwrap_or_else(Utc::now);
    let ms = (end - start).num_milliseconds().max(0);
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}
