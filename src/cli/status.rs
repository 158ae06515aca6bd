//! `lambda-ctl status`: a compact overview for an operator — pipelines (rate, lag, open
//! segment, batch cutoff age, sink lag), the views' sinks (state, lag, rows, last error) when a
//! server answers, workflows (next fire, last run), recent runs; failing things
//! first. The state DB is always read (no server needed); when a server of the project answers
//! (`serve.listen`, or `--server`), its live figures are added. `--json` for scripts.
//!
//! Secrets stay out: URLs are shown through [`redact`], the token never.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::CliError;
use super::client::Client;
use super::runs::{aligned, table, time};
use super::serve::redact;
use super::worker::runtime;
use crate::orchestration::overview::{self, WorkflowOverview};
use crate::spec::Project;
use crate::state::{Run, RunKind, RunState, State, VerifyStatus};

/// Runs listed under "recent runs".
const RECENT_RUNS: u32 = 10;
/// How long to wait for a server before reporting from the state DB alone.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(project_dir: &Path, server: Option<&str>, as_json: bool) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let (report, recent) = runtime()?.block_on(collect(&project, server))?;
    let text = if as_json {
        serde_json::to_string_pretty(&report).context("encoding the status")? + "\n"
    } else {
        render(&report, &recent)
    };
    // A reader that stops early (`status | head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing the status").into())
        }
        _ => Ok(()),
    }
}

/// Everything `status` shows, as the JSON it prints with `--json`; and the recent runs, failed
/// first, for the text table.
async fn collect(project: &Project, server: Option<&str>) -> Result<(Value, Vec<Run>), CliError> {
    let settings = &project.settings;
    let db = State::open(&settings.state)
        .await
        .with_context(|| format!("opening the state DB {}", redact(&settings.state)))?;
    let now = Utc::now();
    let (live, server_json) = live_figures(project, server).await;

    let workflows = overview::workflows(&project.workflows, &db, now)
        .await
        .context("reading workflows from the state DB")?;
    let verified = db
        .verify_statuses()
        .await
        .context("reading verify results")?;
    let mut pipelines = Vec::new();
    for p in &project.pipelines {
        let segments = db
            .segments(&p.name)
            .await
            .context("reading the archive manifest")?;
        let dead_letters = db
            .dead_letters(&p.name)
            .await
            .context("reading dead letters")?;
        let last_batch = db
            .runs(Some(&p.name), 20)
            .await
            .context("reading runs")?
            .into_iter()
            .find(|r| r.kind == RunKind::Batch);
        let restated = db
            .ledger_totals(&p.name, None, None)
            .await
            .context("reading the restatement ledger")?;
        let candidates = db
            .candidates(&p.name)
            .await
            .context("reading the candidate versions")?;
        let live = live.get(&p.name);
        let mut views = Vec::new();
        for v in &p.views {
            let candidate = candidates
                .iter()
                .find(|c| c.publication.view == v.name)
                .map(|c| {
                    json!({
                        "run": c.publication.run_id.0,
                        "age_s": (now.timestamp_millis() - c.created_at_ms).max(0) as f64 / 1000.0,
                    })
                });
            let published = db
                .current_publication(&p.name, &v.name)
                .await
                .context("reading publications")?;
            let live_age = live
                .and_then(|l| l["batch_cutoff_age_s"].get(&v.name))
                .and_then(Value::as_f64);
            let age = live_age.or_else(|| {
                published
                    .as_ref()
                    .map(|pb| (now - pb.published_at).num_milliseconds().max(0) as f64 / 1000.0)
            });
            views.push(json!({
                "name": v.name,
                "batch_run": published.as_ref().map(|pb| pb.run_id.0),
                "batch_cutoff_age_s": age,
                "restated": restated.get(&v.name).map(|t| json!({
                    "late_events": t.late_events,
                    "restated_windows": t.restated_windows,
                    "max_lateness_ms": t.max_lateness_ms,
                })),
                "candidate": candidate,
            }));
        }
        let verified = verified.get(&p.name);
        let failing = last_batch
            .as_ref()
            .is_some_and(|r| r.state == RunState::Failed)
            || verified.is_some_and(|v| !v.last.ok);
        pipelines.push(json!({
            "name": p.name,
            "source": p.source.kind(),
            "failing": failing,
            "sealed_segments": segments.len(),
            "archived_events": segments.iter().map(|s| s.rows).sum::<u64>(),
            "dead_letters": dead_letters,
            "last_batch_run": last_batch.as_ref().map(run_json),
            "views": views,
            "verified": verified.map(verify_json),
            "live": live.cloned(),
        }));
    }
    failing_first(&mut pipelines);
    let nodes = nodes_json(project, &db, now).await?;

    let mut workflows: Vec<Value> = workflows.iter().map(workflow_json).collect();
    failing_first(&mut workflows);
    let mut recent = db.runs(None, RECENT_RUNS).await.context("reading runs")?;
    recent.sort_by_key(|r| r.state != RunState::Failed);
    db.close().await;
    let report = json!({
        "state": redact(&settings.state),
        "lake": redact(&settings.lake),
        "server": server_json,
        "pipelines": pipelines,
        "nodes": nodes,
        "workflows": workflows,
        "recent_runs": recent.iter().map(run_json).collect::<Vec<_>>(),
    });
    Ok((report, recent))
}

/// `/v1/pipelines` of the project's server, by pipeline name; empty when none answers.
async fn live_figures(project: &Project, server: Option<&str>) -> (BTreeMap<String, Value>, Value) {
    let client = match Client::new(project, server) {
        Ok(c) => c,
        Err(e) => {
            return (
                BTreeMap::new(),
                json!({"reachable": false, "error": e.to_string()}),
            );
        }
    };
    let req = client
        .request(reqwest::Method::GET, "/v1/pipelines")
        .timeout(SERVER_TIMEOUT);
    let answer = client.send(req).await.and_then(|body| {
        serde_json::from_slice::<Value>(&body)
            .map_err(|e| CliError::User(format!("the server's answer is not JSON: {e}")))
    });
    match answer {
        Ok(v) => {
            let by_name: BTreeMap<String, Value> = v["pipelines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p["name"].as_str()?.to_string(), p.clone())))
                .filter(|(name, _)| project.pipeline(name).is_some())
                .collect();
            let server = json!({"url": client.base(), "reachable": true});
            (by_name, server)
        }
        Err(e) => (
            BTreeMap::new(),
            json!({"url": client.base(), "reachable": false, "error": e.to_string()}),
        ),
    }
}

/// The latest `verify` of a pipeline and its last success.
fn verify_json(v: &VerifyStatus) -> Value {
    json!({
        "ok": v.last.ok,
        "at": v.last.finished_at,
        "run_id": v.last.run_id.map(|r| r.0),
        "segments": v.last.segments,
        "events": v.last.events,
        "problems": v.last.problems,
        "last_success": v.last_success,
    })
}

fn run_json(r: &Run) -> Value {
    json!({
        "id": r.id.0,
        "kind": r.kind.as_str(),
        "name": r.name,
        "state": r.state.as_str(),
        "scheduled_at": r.scheduled_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "error": r.error,
    })
}

fn workflow_json(w: &WorkflowOverview) -> Value {
    json!({
        "name": w.name,
        "schedule": w.schedule,
        "timezone": w.timezone,
        "next_fire": w.next_fire,
        "failing": w.last_run.as_ref().is_some_and(|r| r.state == RunState::Failed),
        "last_run": w.last_run.as_ref().map(run_json),
        "runs": w.runs,
    })
}

/// Stable: failing entries first, each group in its original order.
fn failing_first(items: &mut [Value]) {
    items.sort_by_key(|v| !v["failing"].as_bool().unwrap_or(false));
}

fn render(r: &Value, recent: &[Run]) -> String {
    let now = Utc::now();
    let mut out = String::new();
    let server = &r["server"];
    let live = if server["reachable"].as_bool() == Some(true) {
        format!("live from {}", server["url"].as_str().unwrap_or("?"))
    } else {
        format!(
            "no server at {} (figures from the state DB only)",
            server["url"].as_str().unwrap_or("?")
        )
    };
    out.push_str(&format!(
        "state {}  ·  {live}\n\nPIPELINES\n",
        r["state"].as_str().unwrap_or("?")
    ));
    let header = [
        "",
        "NAME",
        "SOURCE",
        "RATE/S",
        "LAG",
        "OPEN SEGMENT",
        "SEALED",
        "REJECTED",
        "FILTERED",
        "BATCH CUTOFF AGE",
        "SINK LAG",
        "VERIFIED",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = items(&r["pipelines"])
        .map(|p| {
            let l = &p["live"];
            let stalest = items(&p["views"])
                .map(|v| v["batch_cutoff_age_s"].as_f64())
                .try_fold(0.0f64, |acc, a| a.map(|a| acc.max(a)));
            vec![
                mark(p),
                text(&p["name"]),
                text(&p["source"]),
                l["ingest_rate"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.1}")),
                l["source_lag"]
                    .as_u64()
                    .map_or("-".into(), |x| x.to_string()),
                match (
                    l["open_segment_rows"].as_u64(),
                    l["open_segment_age_ms"].as_u64(),
                ) {
                    (Some(0), _) => "empty".into(),
                    (Some(rows), Some(ms)) => {
                        // Partitioned: the open segments of all, and the oldest one's age.
                        let across = match l["partitions"].as_array().map_or(1, Vec::len) {
                            1 => String::new(),
                            n => format!(" in {n} partitions"),
                        };
                        format!("{rows} rows{across}, {}", age(ms as f64 / 1000.0))
                    }
                    _ => "-".into(),
                },
                text(&p["sealed_segments"]),
                l["rejected"].as_u64().map_or_else(
                    || format!("{} archived", text(&p["dead_letters"])),
                    |x| x.to_string(),
                ),
                l["filtered"].as_u64().map_or("-".into(), |x| x.to_string()),
                match stalest {
                    Some(a) if p["views"].as_array().is_some_and(|v| !v.is_empty()) => age(a),
                    _ => "never published".into(),
                },
                // The furthest behind of the pipeline's sinks.
                items(&l["sinks"])
                    .filter_map(|s| s["lag_s"].as_f64())
                    .reduce(f64::max)
                    .map_or("-".into(), age),
                verified_cell(&p["verified"], now),
            ]
        })
        .collect();
    out.push_str(&aligned(&header, &rows));

    let problems: Vec<String> = items(&r["pipelines"])
        .flat_map(|p| {
            items(&p["verified"]["problems"])
                .take(MAX_PROBLEMS)
                .map(move |x| format!("{}: {}", text(&p["name"]), text(x)))
        })
        .collect();
    if !problems.is_empty() {
        out.push_str("\nVERIFY PROBLEMS\n");
        for line in problems {
            out.push_str(&format!("! {line}\n"));
        }
    }

    let late: Vec<Vec<String>> = items(&r["pipelines"])
        .flat_map(|p| {
            items(&p["views"])
                .filter(|v| !v["restated"].is_null())
                .map(move |v| {
                    let t = &v["restated"];
                    vec![
                        format!("{}.{}", text(&p["name"]), text(&v["name"])),
                        text(&t["late_events"]),
                        text(&t["restated_windows"]),
                        match t["max_lateness_ms"].as_f64() {
                            Some(ms) if ms > 0.0 => {
                                format!("{} after its window's end", age(ms / 1000.0))
                            }
                            _ => "-".into(),
                        },
                    ]
                })
        })
        .collect();
    let candidates: Vec<Vec<String>> = items(&r["pipelines"])
        .flat_map(|p| {
            items(&p["views"])
                .filter(|v| !v["candidate"].is_null())
                .map(move |v| {
                    let c = &v["candidate"];
                    vec![
                        format!("{}.{}", text(&p["name"]), text(&v["name"])),
                        text(&c["run"]),
                        format!("{} ago", age(c["age_s"].as_f64().unwrap_or(0.0))),
                    ]
                })
        })
        .collect();
    if !candidates.is_empty() {
        out.push_str(
            "\nCANDIDATES (lambda-ctl diff PIPELINE.VIEW compares one with the live view)\n",
        );
        let header = ["VIEW", "RUN", "COMPUTED"].map(String::from).to_vec();
        out.push_str(&aligned(&header, &candidates));
    }
    if !late.is_empty() {
        out.push_str("\nRESTATED WINDOWS (GET /v1/views/PIPELINE/VIEW/restatements lists them)\n");
        let header = [
            "VIEW",
            "LATE EVENTS",
            "RESTATED WINDOWS",
            "LATEST LATE EVENT",
        ]
        .map(String::from)
        .to_vec();
        out.push_str(&aligned(&header, &late));
    }

    let sinks: Vec<Vec<String>> = items(&r["pipelines"])
        .flat_map(|p| {
            items(&p["live"]["sinks"]).map(move |s| {
                vec![
                    if s["state"] == "ok" { "" } else { "!" }.to_string(),
                    format!("{}.{}", text(&p["name"]), text(&s["view"])),
                    text(&s["sink"]),
                    text(&s["state"]),
                    s["lag_s"].as_f64().map_or("-".into(), age),
                    text(&s["rows"]),
                    text(&s["error"]),
                ]
            })
        })
        .collect();
    if !sinks.is_empty() {
        out.push_str("\nSINKS\n");
        let header = ["", "VIEW", "SINK", "STATE", "LAG", "ROWS", "ERROR"]
            .map(String::from)
            .to_vec();
        out.push_str(&aligned(&header, &sinks));
    }

    let nodes: Vec<Vec<String>> = items(&r["nodes"])
        .map(|n| {
            let held: Vec<&str> = items(&n["partitions"]).filter_map(Value::as_str).collect();
            vec![
                mark(n),
                text(&n["name"]),
                text(&n["listen"]),
                n["heartbeat_age_s"].as_f64().map_or("-".into(), age),
                if held.is_empty() {
                    "-".into()
                } else {
                    held.join(" ")
                },
            ]
        })
        .collect();
    if !nodes.is_empty() {
        out.push_str("\nNODES\n");
        let header = ["", "NAME", "ADDRESS", "HEARTBEAT", "PARTITIONS"]
            .map(String::from)
            .to_vec();
        out.push_str(&aligned(&header, &nodes));
    }

    out.push_str("\nWORKFLOWS\n");
    let header = ["", "NAME", "SCHEDULE", "NEXT FIRE", "LAST RUN"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = items(&r["workflows"])
        .map(|w| {
            let last = &w["last_run"];
            vec![
                mark(w),
                text(&w["name"]),
                w["schedule"].as_str().map_or("manual".into(), |s| {
                    format!("{s} ({})", w["timezone"].as_str().unwrap_or("UTC"))
                }),
                w["next_fire"]
                    .as_str()
                    .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                    .map_or("-".into(), time),
                if last.is_null() {
                    "never ran".into()
                } else {
                    format!("#{} {}", text(&last["id"]), text(&last["state"]))
                },
            ]
        })
        .collect();
    out.push_str(&aligned(&header, &rows));

    out.push_str("\nRECENT RUNS\n");
    out.push_str(&table(recent));
    out
}

/// The nodes (`serve --node`) on the state DB, each with the partitions it holds the leases
/// of; a node not heard of for a lease's length is gone (its leases are taken over).
async fn nodes_json(
    project: &Project,
    db: &State,
    now: DateTime<Utc>,
) -> Result<Vec<Value>, CliError> {
    let names = project.pipelines.iter().map(|p| p.name.as_str());
    let nodes = crate::speed::nodes::overview(db, names, now.timestamp_millis())
        .await
        .context("reading nodes and leases")?;
    Ok(nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "listen": n.listen,
                "heartbeat_age_s": n.heartbeat_age_ms as f64 / 1000.0,
                "failing": !n.alive,
                "partitions": n.partitions,
            })
        })
        .collect())
}

/// Problems of a failed `verify` listed per pipeline (the JSON has all of them).
const MAX_PROBLEMS: usize = 5;

/// `ok 3m ago`, `FAILED 10s ago (ok 2h ago)`, or `never`.
fn verified_cell(v: &Value, now: DateTime<Utc>) -> String {
    let ago = |t: &Value| {
        t.as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .map_or("?".into(), |t| {
                format!(
                    "{} ago",
                    age((now - t).num_milliseconds().max(0) as f64 / 1000.0)
                )
            })
    };
    match v["ok"].as_bool() {
        None => "never".into(),
        Some(true) => format!("ok {}", ago(&v["at"])),
        Some(false) if v["last_success"].is_null() => format!("FAILED {}", ago(&v["at"])),
        Some(false) => format!("FAILED {} (ok {})", ago(&v["at"]), ago(&v["last_success"])),
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn mark(v: &Value) -> String {
    if v["failing"].as_bool() == Some(true) {
        "!".into()
    } else {
        String::new()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `42s`, `4m12s`, `3h05m`, `2d03h`.
pub(super) fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
        _ => format!("{}d{:02}h", s / 86400, (s / 3600) % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::age;

    #[test]
    fn ages_are_compact() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(252.0), "4m12s");
        assert_eq!(age(3.0 * 3600.0 + 300.0), "3h05m");
        assert_eq!(age(2.0 * 86400.0 + 3.0 * 3600.0), "2d03h");
    }
}
