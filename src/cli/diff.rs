//! `lambda-ctl diff PIPELINE.VIEW`: what a view's candidate version (`run --candidate`) would
//! answer against what it answers now, row by row — rows added, removed and changed, with
//! counts and a sample; `lambda-ctl promote PIPELINE`: serve them (and the definition in
//! pipelines/); and `lambda-ctl discard PIPELINE`: forget them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use super::CliError;
use super::client::Client;
use super::query::resolve;
use crate::serving::format;
use crate::serving::promote::{self, Promoted};

/// What changed between two answers of a view.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    pub added: Vec<Value>,
    pub removed: Vec<Value>,
    /// (live, candidate) rows of one window and group whose values differ.
    pub changed: Vec<(Value, Value)>,
    pub unchanged: usize,
}

/// A row's window and group (by the candidate's `group_by`).
fn key(group_by: &[String], row: &Value) -> String {
    let mut k = vec![row["window_start"].clone()];
    k.extend(group_by.iter().map(|g| row[g.as_str()].clone()));
    Value::Array(k).to_string()
}

/// Two cells alike: equal, or numbers within float rounding.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// Rows of `live` and `candidate` matched by window and group.
pub fn diff(group_by: &[String], live: &[Value], candidate: &[Value]) -> Diff {
    let mut left: BTreeMap<String, &Value> = live.iter().map(|r| (key(group_by, r), r)).collect();
    let mut d = Diff::default();
    for row in candidate {
        match left.remove(&key(group_by, row)) {
            None => d.added.push(row.clone()),
            Some(old) => {
                let (a, b) = (old.as_object(), row.as_object());
                let alike = match (a, b) {
                    (Some(a), Some(b)) => {
                        a.len() == b.len()
                            && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
                    }
                    _ => old == row,
                };
                if alike {
                    d.unchanged += 1;
                } else {
                    d.changed.push((old.clone(), row.clone()));
                }
            }
        }
    }
    d.removed = left.into_values().cloned().collect();
    d
}

pub struct Args<'a> {
    pub target: &'a str,
    pub sample: usize,
    pub json: bool,
    pub server: Option<&'a str>,
}

pub fn run(project_dir: &Path, a: Args) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let (view, pipeline, name) = resolve(&project, a.target)?;
    let client = Client::new(&project, a.server)?;
    let path = format!("/v1/views/{pipeline}/{name}");
    let candidate = client.get_json(&path, &[("version".into(), "candidate".into())])?;
    // A view the candidate adds has no live answer: every row is added.
    let live = match client.get_json(&path, &[]) {
        Ok(v) => v,
        Err(CliError::User(m)) if m.contains(&format!("has no view `{name}`")) => {
            json!({"rows": [], "as_of": {}})
        }
        Err(e) => return Err(e),
    };
    let rows = |v: &Value| v["rows"].as_array().cloned().unwrap_or_default();
    let d = diff(&view.group_by, &rows(&live), &rows(&candidate));
    let n = a.sample;
    if a.json {
        let out = json!({
            "live": {"batch_run": live["as_of"]["batch_run"], "at": live["as_of"]["at"]},
            "candidate": {"batch_run": candidate["as_of"]["batch_run"]},
            "added": d.added.len(), "removed": d.removed.len(),
            "changed": d.changed.len(), "unchanged": d.unchanged,
            "sample": {
                "added": d.added.iter().take(n).collect::<Vec<_>>(),
                "removed": d.removed.iter().take(n).collect::<Vec<_>>(),
                "changed": d.changed.iter().take(n)
                    .map(|(l, c)| json!({"live": l, "candidate": c}))
                    .collect::<Vec<_>>(),
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("encoding JSON")?
        );
        return Ok(());
    }
    println!(
        "{}: candidate (run {}) against live: {} added, {} removed, {} changed, {} unchanged",
        a.target,
        candidate["as_of"]["batch_run"].as_str().unwrap_or("?"),
        d.added.len(),
        d.removed.len(),
        d.changed.len(),
        d.unchanged
    );
    let columns = crate::serving::query::columns(view);
    for (what, sample) in [("added", &d.added), ("removed", &d.removed)] {
        if !sample.is_empty() {
            println!(
                "\n{what} (first {} of {}):",
                n.min(sample.len()),
                sample.len()
            );
            let some: Vec<Value> = sample.iter().take(n).cloned().collect();
            print!("{}", format::table(&columns, &some));
        }
    }
    if !d.changed.is_empty() {
        println!(
            "\nchanged (first {} of {}; live, then candidate):",
            n.min(d.changed.len()),
            d.changed.len()
        );
        let some: Vec<Value> = d
            .changed
            .iter()
            .take(n)
            .flat_map(|(l, c)| [l.clone(), c.clone()])
            .collect();
        print!("{}", format::table(&columns, &some));
    }
    Ok(())
}

/// `lambda-ctl discard PIPELINE`: forgets the pipeline's candidate versions.
pub fn discard(project_dir: &Path, pipeline: &str) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    if project.pipeline(pipeline).is_none() {
        return Err(CliError::User(format!("unknown pipeline `{pipeline}`")));
    }
    let rt = super::worker::runtime()?;
    rt.block_on(async {
        let db = crate::state::State::open(&project.settings.state)
            .await
            .context("opening the state DB")?;
        let gone = db
            .discard_candidates(pipeline)
            .await
            .context("discarding the candidates")?;
        if gone.is_empty() {
            println!("{pipeline}: no candidate versions");
        }
        for c in &gone {
            println!(
                "{pipeline}.{}: discarded the candidate of run {} (its files go with the next run's GC)",
                c.publication.view, c.publication.run_id
            );
        }
        db.close().await;
        Ok(())
    })
}

/// `promote PIPELINE`: by the running server when one answers (it switches in place), else
/// in the state DB alone (the next `serve` runs the new definition).
pub fn promote(project_dir: &Path, pipeline: &str, server: Option<&str>) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let Some(spec) = project.pipeline(pipeline) else {
        return Err(CliError::User(format!("unknown pipeline `{pipeline}`")));
    };
    let client = Client::new(&project, server)?;
    let rt = super::worker::runtime()?;
    let path = format!("/v1/pipelines/{pipeline}/promote");
    let sent = rt.block_on(client.request(reqwest::Method::POST, &path).send());
    let promoted: Promoted = match sent {
        Err(e) if e.is_connect() && server.is_none() => {
            // No server: the state alone.
            let plan =
                crate::plan::Plan::compile(spec).map_err(|e| CliError::User(format!("{e:#}")))?;
            let promoted = rt.block_on(async {
                let db = crate::state::State::open(&project.settings.state)
                    .await
                    .context("opening the state DB")?;
                let promoted = promote::promote_stored(&db, &plan).await;
                db.close().await;
                Ok::<_, CliError>(promoted)
            })?;
            let promoted = promoted.map_err(|e| CliError::User(e.to_string()))?;
            println!(
                "no server answers at {}: promoted in the state DB; the next `lambda-ctl serve` runs the definition in pipelines/",
                client.base()
            );
            promoted
        }
        sent => {
            let body = rt.block_on(async {
                let resp = sent.map_err(|e| {
                    CliError::User(format!("cannot reach lambda-ctl at {}: {e}", client.base()))
                })?;
                client.answer(resp).await
            })?;
            serde_json::from_slice(&body).context("decoding the server's answer")?
        }
    };
    for v in &promoted.views {
        let from = match (v.from, &v.run) {
            (promote::Origin::Candidate, Some(run)) => format!("its candidate (run {run})"),
            (promote::Origin::Current, Some(run)) => format!("the version run {run} published"),
            _ => "the speed layer, from the archive".to_string(),
        };
        println!("{pipeline}.{}: promoted {from}", v.view);
    }
    if let Some(at) = &promoted.at {
        println!("{pipeline}: the server runs the definition in pipelines/ from {at}");
    }
    for (node, outcome) in &promoted.nodes {
        println!("{pipeline}: node {node}: {outcome}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_matched_by_window_and_group() {
        let view = ["c".to_string()];
        let row = |t: &str, c: &str, n: u64, s: f64| json!({"window_start": t, "window_end": t, "c": c, "n": n, "s": s});
        let live = [
            row("10:00", "DE", 2, 3.0),
            row("10:00", "US", 1, 1.0),
            row("10:01", "DE", 1, 0.1 + 0.2),
        ];
        let candidate = [
            row("10:00", "DE", 2, 3.0),
            row("10:00", "US", 5, 9.0),
            row("10:01", "DE", 1, 0.3),
            row("10:02", "FR", 1, 1.0),
        ];
        let d = diff(&view, &live, &candidate);
        assert_eq!(d.unchanged, 2, "float rounding is not a change");
        assert_eq!(d.added, [row("10:02", "FR", 1, 1.0)]);
        assert!(d.removed.is_empty());
        assert_eq!(
            d.changed,
            [(row("10:00", "US", 1, 1.0), row("10:00", "US", 5, 9.0))]
        );
        let d = diff(&view, &candidate, &live);
        assert_eq!(d.removed, [row("10:02", "FR", 1, 1.0)]);
    }
}
