//! `lambda-ctl restatements PIPELINE.VIEW`: a view's restatement ledger from a running server —
//! the windows late events or a restating publication changed after they were served.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use super::CliError;
use super::client::Client;
use super::query::{resolve, time_params};
use super::status::age;
use crate::serving::format;

pub struct Args<'a> {
    pub target: &'a str,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub limit: Option<u64>,
    pub json: bool,
    pub server: Option<&'a str>,
}

pub fn run(project_dir: &Path, a: Args) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let (view, pipeline, name) = resolve(&project, a.target)?;
    let mut params = time_params(a.from, a.to)?;
    if let Some(n) = a.limit {
        params.push(("limit".into(), n.to_string()));
    }
    let answer = Client::new(&project, a.server)?.get_json(
        &format!("/v1/views/{pipeline}/{name}/restatements"),
        &params,
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).context("encoding JSON")?
        );
        return Ok(());
    }
    let entries = answer["restatements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut columns: Vec<String> = ["recorded_at", "cause", "window_start"]
        .map(String::from)
        .to_vec();
    columns.extend(view.group_by.iter().cloned());
    columns.extend(["late_events", "lateness"].map(String::from));
    columns.extend(view.metrics.iter().map(|m| m.name.clone()));
    let rows: Vec<Value> = entries.iter().map(|e| row(e, view)).collect();
    print!("{}", format::table(&columns, &rows));
    let t = &answer["totals"];
    println!(
        "{} restated window(s), {} late event(s){}{}",
        t["restated_windows"],
        t["late_events"],
        match t["max_lateness_ms"].as_i64() {
            Some(ms) if ms > 0 => format!(", the latest {} after its window's end", lateness(ms)),
            _ => String::new(),
        },
        if answer["truncated"] == true {
            format!(" · only the first {} shown (--limit)", entries.len())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// An entry as a table row: its cause, window and key, and each metric as `before → after`.
fn row(e: &Value, view: &crate::spec::View) -> Value {
    let mut row = json!({
        "recorded_at": e["recorded_at"],
        "cause": match e["cause"].as_str() {
            Some("publication") => format!("publication (run {})", e["publication"]["run_id"]),
            Some(c) => c.to_string(),
            None => "?".into(),
        },
        "window_start": e["window_start"],
        "late_events": e["late_events"],
        "lateness": e["max_lateness_ms"].as_i64().filter(|ms| *ms > 0).map(lateness),
    });
    for g in &view.group_by {
        row[g.as_str()] = e["key"][g.as_str()].clone();
    }
    for m in &view.metrics {
        let cell = &e["metrics"][m.name.as_str()];
        row[m.name.as_str()] = Value::String(format!(
            "{} → {}",
            text(&cell["before"]),
            text(&cell["after"])
        ));
    }
    row
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Milliseconds as `status` shows ages: `4m12s`, `3h05m`, `2d03h`.
fn lateness(ms: i64) -> String {
    age(ms as f64 / 1000.0)
}
