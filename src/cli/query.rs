//! `lambda-ctl query PIPELINE.VIEW`: ask a running server for a view, print a table, JSON or CSV.

use std::path::Path;

use anyhow::Context;

use super::CliError;
use super::client::Client;
use crate::clock;
use crate::serving::{format, query, time};

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
    pub format: OutputFormat,
    pub server: Option<&'a str>,
}

pub fn run(project_dir: &Path, a: Args) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let Some((pipeline, view)) = a.target.split_once('.') else {
        return Err(CliError::User(format!(
            "`{}` is not PIPELINE.VIEW",
            a.target
        )));
    };
    let p = project
        .pipeline(pipeline)
        .ok_or_else(|| CliError::User(format!("unknown pipeline `{pipeline}`")))?;
    let v = p.view(view).ok_or_else(|| {
        let views: Vec<&str> = p.views.iter().map(|v| v.name.as_str()).collect();
        CliError::User(format!(
            "pipeline `{pipeline}` has no view `{view}` (views: {})",
            views.join(", ")
        ))
    })?;
    let mut params: Vec<(String, String)> = Vec::new();
    for f in a.filters {
        let (c, val) = f
            .split_once('=')
            .ok_or_else(|| CliError::User(format!("--where `{f}` is not COL=VALUE")))?;
        params.push((c.to_string(), val.to_string()));
    }
    // Resolve relative times here so the server and the user agree on "now".
    let now = clock::now_ms();
    for (k, t) in [("from", a.from), ("to", a.to)] {
        if let Some(t) = t {
            let ms = time::parse_time(t, now).map_err(CliError::User)?;
            params.push((k.to_string(), clock::format_ms(ms)));
        }
    }
    params.push(("format".into(), "json".into()));
    let client = Client::new(&project, a.server)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let body = rt.block_on(
        client.send(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/v1/views/{pipeline}/{view}"),
                )
                .query(&params),
        ),
    )?;
    let answer: serde_json::Value =
        serde_json::from_slice(&body).context("decoding the server's answer")?;
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
                "{} rows · batch run {} ({} partial rows) · speed {} partial rows from {} segments",
                rows.len(),
                as_of["batch_run"].as_str().unwrap_or("none"),
                as_of["batch_rows"],
                as_of["speed_rows"],
                as_of["speed_segments"]
            );
        }
    }
    Ok(())
}
