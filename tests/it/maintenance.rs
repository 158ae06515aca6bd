//! Archive maintenance through `serve` and the workflow API: `compact` changes the manifest,
//! never an answer (every view still equals the oracle, `verify` still agrees); `retention`
//! changes answers only by retiring the windows that ended before `now - keep`, in every layer
//! (the rest still equals the oracle, `verify` still agrees); and the repository's nightly
//! workflow runs to success.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lambda_ctl::batch::maintenance;
use lambda_ctl::lake::Lake;
use lambda_ctl::state::{RunState, Segment, State};
use serde_json::Value;

use crate::lambda::{VIEWS, kept, run_batch, wait_for_batch};
use crate::orders::{
    BASE_MS, Ev, check_views, check_views_after, events, get_view, post, project, send,
    wait_for_count,
};
use crate::support::{
    Rng, Server, eventually, get_json, lambda_ctl, repo, stderr, stdout, wait_for_sealed,
};

const MAINT: &str = "name: maint\ntasks:\n  - name: recompute\n    batch: orders\n  - name: compact\n    compact: orders\n    needs: [recompute]\n";
const TRIM: &str =
    "name: trim\ntasks:\n  - name: trim\n    retention: {pipeline: orders, keep: 3650d}\n";

/// `POST /v1/workflows/{w}/runs`, then `GET /v1/runs/{id}` until the run finished.
pub async fn run_workflow(client: &reqwest::Client, server: &Server, workflow: &str) -> Value {
    let resp = client
        .post(server.url(&format!("/v1/workflows/{workflow}/runs")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["run_id"]
        .as_i64()
        .expect("run_id");
    let start = Instant::now();
    loop {
        let run: Value = get_json(client, server.url(&format!("/v1/runs/{id}"))).await;
        assert_eq!(run["id"].as_i64(), Some(id), "{run}");
        if ["succeeded", "failed", "cancelled"].contains(&run["state"].as_str().unwrap_or("")) {
            return run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "run {id} of {workflow} did not finish in 60 s: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn assert_succeeded(run: &Value) {
    assert_eq!(run["state"], "succeeded", "{run:#}");
    for t in run["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "succeeded", "{run:#}");
    }
}

/// Sends `evs` in bursts, each sealed (by the 1 s segment age) before the next: small segments.
async fn send_in_bursts(
    client: &reqwest::Client,
    server: &Server,
    rng: &mut Rng,
    evs: &[Ev],
) -> Vec<Ev> {
    let mut acked = Vec::new();
    let mut sealed = wait_for_sealed(client, server, "orders", 0).await;
    for burst in evs.chunks(90) {
        acked.extend(send(client, server, rng, burst).await);
        sealed = wait_for_sealed(client, server, "orders", sealed + 1).await;
    }
    acked
}

/// Waits until the windowed views are served from batch run `id` (a retention republishes
/// those only).
async fn wait_for_windowed_views(client: &reqwest::Client, server: &Server, id: &str) {
    let start = Instant::now();
    for view in VIEWS.iter().filter(|v| **v != "overall") {
        while get_view(client, server, view).await["as_of"]["batch_run"].as_str() != Some(id) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "view {view} not served from run {id} after 3 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn latest_batch_run(state: &State) -> String {
    let runs = state.runs(Some("orders"), 1).await.unwrap();
    assert_eq!(runs[0].state, RunState::Succeeded, "{runs:?}");
    runs[0].id.to_string()
}

fn positions(segments: &[Segment]) -> (u64, u64, u64) {
    (
        segments.iter().map(|s| s.lo).min().unwrap_or(0),
        segments.iter().map(|s| s.hi).max().unwrap_or(0),
        segments.iter().map(|s| s.rows).sum(),
    )
}

fn verify(project: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["verify", "orders", "--project"])
        .arg(project)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "verify: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_retention_change_no_answer() {
    let dir = project();
    std::fs::create_dir_all(dir.path().join("workflows")).unwrap();
    std::fs::write(dir.path().join("workflows/maint.yaml"), MAINT).unwrap();
    std::fs::write(dir.path().join("workflows/trim.yaml"), TRIM).unwrap();
    let spec = lambda_ctl::spec::load(dir.path()).expect("valid project");
    let client = reqwest::Client::new();
    let mut rng = Rng(11);
    let evs = events(&mut rng, 900, 0);

    let server = Server::start(dir.path());
    let mut acked = send_in_bursts(&client, &server, &mut rng, &evs[..540]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    let state = State::open(&spec.settings.state).await.unwrap();
    let lake = Lake::open(&spec.settings.lake, &spec.settings.lake_options).unwrap();
    let before = state.segments("orders").await.unwrap();
    assert!(before.len() >= 4, "{} segments", before.len());

    // recompute → compact, through the HTTP API of the serving process.
    let run = run_workflow(&client, &server, "maint").await;
    assert_succeeded(&run);
    let after = state.segments("orders").await.unwrap();
    assert!(
        after.len() < before.len(),
        "{} segments before, {} after",
        before.len(),
        after.len()
    );
    assert_eq!(positions(&after), positions(&before));
    for w in after.windows(2) {
        assert_eq!(w[0].hi, w[1].lo, "the manifest stays contiguous");
    }
    for s in &after {
        assert!(
            lake.exists(&s.path).await.unwrap(),
            "{} is in the lake",
            s.path
        );
    }
    wait_for_batch(&client, &server, &latest_batch_run(&state).await).await;
    check_views(&client, &server, &acked).await;

    // An incremental run on the compacted archive, then a full recompute (`verify`) agrees.
    acked.extend(send_in_bursts(&client, &server, &mut rng, &evs[540..720]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    let run2 = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run2).await;
    check_views(&client, &server, &acked).await;
    assert_eq!(verify(dir.path()).matches(": ok (").count(), VIEWS.len());

    // Retention now, keeping ten years: no event is that old, and every segment was sealed
    // within the dedupe window (a restart rebuilds the dedupe index from them): nothing goes.
    let covered_before = state.segments("orders").await.unwrap();
    let run = run_workflow(&client, &server, "trim").await;
    assert_succeeded(&run);
    assert_eq!(state.segments("orders").await.unwrap(), covered_before);
    wait_for_windowed_views(&client, &server, &latest_batch_run(&state).await).await;
    check_views(&client, &server, &acked).await;

    // Two days later (the task's clock), keeping what ended after BASE + 30 min: the windows
    // that ended by then go — from the batch view and from the speed layer's part of the
    // answer alike — while every segment (events arrived shuffled) has newer events and stays.
    // Windows across the horizon stay whole; `verify` still agrees.
    let pipeline = &spec.pipelines[0];
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    let horizon = BASE_MS + 30 * 60_000;
    let keep = Duration::from_millis((later.timestamp_millis() - horizon) as u64);
    let done = maintenance::retention(&state, &lake, pipeline, keep, later, &|_| {})
        .await
        .unwrap();
    assert_eq!(
        done.views_trimmed,
        VIEWS.len() - 1,
        "all but the all-time view"
    );
    assert!(done.partial_rows_retired > 0, "{done:?}");
    let left = state.segments("orders").await.unwrap();
    let cutoff = state
        .covered(pipeline)
        .await
        .unwrap()
        .expect("every view is published");
    assert!(
        left.iter()
            .filter(|s| lambda_ctl::state::is_covered(&cutoff, s))
            .all(|s| s.max_event_ms.is_some_and(|t| t >= horizon)),
        "only covered segments with events after the horizon stay: {left:?}"
    );
    wait_for_windowed_views(&client, &server, &latest_batch_run(&state).await).await;
    check_views_after(&client, &server, &acked, Some(horizon)).await;
    assert_eq!(verify(dir.path()).matches(": ok (").count(), VIEWS.len());

    // Keeping a day: every covered segment goes, every window (all are older) is retired.
    let before = state.segments("orders").await.unwrap();
    let keep = Duration::from_secs(86_400);
    let done = maintenance::retention(&state, &lake, pipeline, keep, later, &|_| {})
        .await
        .unwrap();
    let horizon = (later - chrono::Duration::days(1)).timestamp_millis();
    let left = state.segments("orders").await.unwrap();
    let cutoff = state
        .covered(pipeline)
        .await
        .unwrap()
        .expect("every view is published");
    assert!(
        left.iter().all(|s| s.hi > cutoff[&s.partition]),
        "only segments the batch does not cover stay: {left:?}"
    );
    assert_eq!(done.segments_dropped, before.len() - left.len());
    // The versions replaced before (of both batch runs and the first retentions) go too;
    // current ones stay.
    assert!(done.view_versions_dropped >= 2 * VIEWS.len(), "{done:?}");
    wait_for_windowed_views(&client, &server, &latest_batch_run(&state).await).await;
    check_views_after(&client, &server, &acked, Some(horizon)).await;
    for view in ["by_country", "hop", "sessions"] {
        let v = get_view(&client, &server, view).await;
        assert_eq!(v["rows"].as_array().map(Vec::len), Some(0), "{view}: {v}");
    }

    // Dropped files stay readable for the grace period, then go.
    let dropped: Vec<&Segment> = covered_before
        .iter()
        .filter(|s| !left.contains(s))
        .collect();
    for s in &dropped {
        assert!(
            lake.exists(&s.path).await.unwrap(),
            "{} kept for the grace period",
            s.path
        );
    }
    let deleted = maintenance::collect_retired_before(
        &state,
        &lake,
        "orders",
        chrono::Utc::now() + chrono::Duration::seconds(1),
    )
    .await
    .unwrap();
    assert!(
        deleted >= dropped.len(),
        "{deleted} deleted, {} dropped",
        dropped.len()
    );
    for s in &dropped {
        assert!(!lake.exists(&s.path).await.unwrap(), "{} deleted", s.path);
    }

    // Life goes on: new events (as old as the others: late), served by no window layer before
    // and after a new incremental run (which carries the horizon forward); still exact.
    acked.extend(send(&client, &server, &mut rng, &evs[720..]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    check_views_after(&client, &server, &acked, Some(horizon)).await;
    let run3 = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run3).await;
    check_views_after(&client, &server, &acked, Some(horizon)).await;

    // The API's answers for unknown names and bad ids.
    let resp = client
        .post(server.url("/v1/workflows/nope/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
    let resp = client.get(server.url("/v1/runs/abc")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    let resp = client
        .get(server.url("/v1/runs/999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
    let list: Value = get_json(&client, server.url("/v1/workflows")).await;
    let names: Vec<&str> = list["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["maint", "trim"]);
    assert_eq!(list["workflows"][0]["runs"][0]["state"], "succeeded");
    state.close().await;
}

#[test]
fn the_repository_nightly_workflow_runs_to_success() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["pipelines", "workflows"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for f in std::fs::read_dir(repo().join(sub)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.path().join(sub).join(f.file_name())).unwrap();
        }
    }
    let project = dir.path().to_str().unwrap();
    let out = lambda_ctl(&["run", "nightly", "--wait", "--project", project]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    for task in ["recompute", "compact", "retention", "verify"] {
        assert!(err.contains(task), "{err}");
    }
    assert!(err.contains("succeeded"), "{err}");
    let id = stdout(&out).trim().to_string();
    let logs = lambda_ctl(&["logs", &id, "--project", project]);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(text.contains("compacted clicks"), "{text}");
    assert!(text.contains("retention of clicks"), "{text}");
    assert!(text.contains("verified clicks"), "{text}");
}

/// A `verify` task on a schedule (every second) passes on an intact archive and reports a
/// deliberately damaged segment, by path: in its failed run, `status`, `/metrics` and each
/// answer's `as_of` — which is still served, from what the speed and batch layers hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_verify_reports_a_damaged_segment() {
    let dir = project();
    std::fs::create_dir_all(dir.path().join("workflows")).unwrap();
    std::fs::write(
        dir.path().join("workflows/check.yaml"),
        "name: check\nschedule: \"* * * * * *\"\ntasks:\n  - name: verify\n    verify: orders\n",
    )
    .unwrap();
    let spec = lambda_ctl::spec::load(dir.path()).expect("valid project");
    let client = reqwest::Client::new();
    let mut rng = Rng(5);
    let evs = events(&mut rng, 180, 0);
    let server = Server::start(dir.path());
    let acked = send_in_bursts(&client, &server, &mut rng, &evs).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    let state = State::open(&spec.settings.state).await.unwrap();
    let segments = state.segments("orders").await.unwrap();
    assert!(segments.len() >= 2, "{segments:?}");
    let n = segments.len() as u64;
    let verified = |want_ok: bool| {
        let (client, server) = (&client, &server);
        async move {
            eventually(
                &format!("a verify with ok = {want_ok} over every segment"),
                Duration::from_secs(30),
                || async move {
                    let v = get_view(client, server, "by_country").await;
                    let seen = &v["as_of"]["verified"];
                    (seen["ok"].as_bool() == Some(want_ok) && seen["segments"].as_u64() == Some(n))
                        .then(|| seen.clone())
                },
            )
            .await
        }
    };
    let passed = verified(true).await;
    assert_eq!(passed["last_success"], passed["at"], "{passed}");

    // Damage the first segment's file in place: same size, 16 bytes inverted mid-file.
    let lake = Lake::open(&spec.settings.lake, &spec.settings.lake_options).unwrap();
    let damaged = &segments[0].path;
    let file = lake
        .local_files([damaged.as_str()])
        .unwrap()
        .expect("a file:// lake")[0]
        .clone();
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b = !*b;
    }
    std::fs::write(&file, &bytes).unwrap();

    let failed = verified(false).await;
    // The latest success: the one seen, or one that ran before the file was damaged (the
    // workflow verifies every second). RFC 3339 in UTC orders as text.
    let (last_success, passed_at) = (text(&failed["last_success"]), text(&passed["at"]));
    assert!(
        last_success >= passed_at && last_success < text(&failed["at"]),
        "{failed} after {passed}"
    );
    // Answers are unchanged by the check.
    check_views(&client, &server, &acked).await;

    // The failed run names the segment; so do `status` (text and JSON) and `/metrics`.
    let runs = state.runs(Some("check"), 50).await.unwrap();
    let run = runs
        .iter()
        .find(|r| r.state == RunState::Failed)
        .unwrap_or_else(|| panic!("a failed verify run: {runs:?}"));
    let attempts = state.task_attempts(run.id).await.unwrap();
    let error = attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains(damaged) && error.contains("checksum"),
        "{attempts:?}"
    );
    let project = dir.path().to_str().unwrap();
    let status = lambda_ctl(&["status", "--json", "--project", project]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let orders = &status["pipelines"][0];
    assert_eq!(orders["failing"], true, "{orders:#}");
    assert_eq!(orders["verified"]["ok"], false, "{orders:#}");
    let problems = orders["verified"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].as_str().unwrap().contains(damaged),
        "{problems:?}"
    );
    let text = stdout(&lambda_ctl(&["status", "--project", project]));
    assert!(
        text.contains("FAILED") && text.contains("VERIFY PROBLEMS"),
        "{text}"
    );
    assert!(text.contains(damaged), "{text}");
    let metrics = server.metrics(&client).await;
    for line in [
        "lambda_verify_ok{pipeline=\"orders\"} 0",
        "lambda_verify_problems{pipeline=\"orders\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("lambda_verify_last_success_timestamp_seconds{pipeline=\"orders\"}"),
        "{metrics}"
    );
    state.close().await;
}

/// A restart rebuilds speed partials only for segments the published batch does not cover:
/// without an `event_id` (no dedupe index to rebuild) the covered segments' files are not even
/// read — deleting them before the restart changes no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_only_segments_the_batch_does_not_cover() {
    let dir = project();
    let spec_file = dir.path().join("pipelines/orders.yaml");
    let spec = std::fs::read_to_string(&spec_file).unwrap();
    std::fs::write(&spec_file, spec.replace("event_id: id\n", "")).unwrap();
    let spec = lambda_ctl::spec::load(dir.path()).expect("valid project");
    let client = reqwest::Client::new();
    let mut rng = Rng(5);
    let evs = events(&mut rng, 700, 0);
    let post_all = |evs: &[Ev], rng: &mut Rng| {
        evs.chunks(100)
            .map(|c| c.iter().map(|e| e.line(rng)).collect::<Vec<_>>().join("\n") + "\n")
            .collect::<Vec<String>>()
    };

    let server = Server::start(dir.path());
    for body in post_all(&evs[..500], &mut rng) {
        post(&client, &server, body).await;
    }
    let mut acked = evs[..500].to_vec();
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_sealed(&client, &server, "orders", 1).await; // the open segment seals by age
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;
    for body in post_all(&evs[500..], &mut rng) {
        post(&client, &server, body).await;
    }
    acked.extend_from_slice(&evs[500..]);
    wait_for_count(&client, &server, kept(&acked)).await;
    server.kill9();

    let state = State::open(&spec.settings.state).await.unwrap();
    let lake = Lake::open(&spec.settings.lake, &spec.settings.lake_options).unwrap();
    let cutoff = state
        .covered(&spec.pipelines[0])
        .await
        .unwrap()
        .expect("published");
    let mut deleted = 0;
    for s in state.segments("orders").await.unwrap() {
        if lambda_ctl::state::is_covered(&cutoff, &s) {
            lake.delete(&s.path).await.unwrap();
            deleted += 1;
        }
    }
    assert!(deleted > 0);
    state.close().await;

    let server = Server::start(dir.path());
    wait_for_batch(&client, &server, &run).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    check_views(&client, &server, &acked).await;
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}
