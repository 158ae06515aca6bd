//! `lambda-ctl query PIPELINE.VIEW`: ask a running server for a view, print a table, JSON or CSV.

use std::path::Path;

use anyhow::Context;

use super::CliError;
use super::client::Client;
use crate::clock;
use crate::serving::{format, query, time};
use crate::spec::{Project, View};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Csv,
}

pub struct Args<'a> {
    pub target: &'a str,
    pub filters: &'a [String],
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub as_of: Option<&'a str>,
    pub format: OutputFormat,
    pub server: Option<&'a str>,
}

/// The view `target` (PIPELINE.VIEW) names in `project`, with the pipeline's and the view's
/// names, or a user error saying what is wrong.
pub(super) fn resolve<'p, 't>(
    project: &'p Project,
    target: &'t str,
) -> Result<(&'p View, &'t str, &'t str), CliError> {
    let Some((pipeline, view)) = target.split_once('.') else {
        return Err(CliError::User(format!("`{target}` is not PIPELINE.VIEW")));
    };
    let p = project
        .pipeline(pipeline)
        .ok_or_else(|| CliError::User(format!("unknown pipeline `{pipeline}`")))?;
    let found = p.view(view).ok_or_else(|| {
        let views: Vec<&str> = p.views.iter().map(|v| v.name.as_str()).collect();
        CliError::User(format!(
            "pipeline `{pipeline}` has no view `{view}` (views: {})",
            views.join(", ")
        ))
    })?;
    Ok((found, pipeline, view))
}

/// `?from=&to=` for `--from/--to`, resolved here so the server and the user agree on "now".
pub(super) fn time_params(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Vec<(String, String)>, CliError> {
    let now = clock::now_ms();
    let mut params = Vec::new();
    for (k, t) in [("from", from), ("to", to)] {
        if let Some(t) = t {
            let ms = time::parse_time(t, now).map_err(CliError::User)?;
            params.push((k.to_string(), clock::format_ms(ms)));
        }
    }
    Ok(params)
}

pub fn run(project_dir: &Path, a: Args) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let (v, pipeline, view) = resolve(&project, a.target)?;
    let mut params: Vec<(String, String)> = Vec::new();
    for f in a.filters {
        let (c, val) = f
            .split_once('=')
            .ok_or_else(|| CliError::User(format!("--where `{f}` is not COL=VALUE")))?;
        params.push((c.to_string(), val.to_string()));
    }
    params.extend(time_params(a.from, a.to)?);
    if let Some(t) = a.as_of {
        // Resolved here, like --from/--to; nanoseconds kept (an answer's `as_of.at`).
        let at = time::parse_instant(t, clock::now_ms()).map_err(CliError::User)?;
        params.push(("as_of".into(), clock::format_ns(at.ns())));
    }
    params.push(("format".into(), "json".into()));
    let answer = Client::new(&project, a.server)?
        .get_json(&format!("/v1/views/{pipeline}/{view}"), &params)?;
    let rows = answer["rows"].as_array().cloned().unwrap_or_default();
    let columns = query::columns(v);
    match a.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&answer).context("encoding JSON")?
        ),
        OutputFormat::Csv => print!("{}", format::csv(&columns, &rows)),
        OutputFormat::Table => {
            print!("{}", format::table(&columns, &rows));
            let as_of = &answer["as_of"];
            println!(
                "{} rows · batch run {} ({} partial rows) · speed {} partial rows from {} segments · as of {}",
                rows.len(),
                as_of["batch_run"].as_str().unwrap_or("none"),
                as_of["batch_rows"],
                as_of["speed_rows"],
                as_of["speed_segments"],
                as_of["at"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
