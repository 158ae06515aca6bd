//! THE lambda test: the promise of DESIGN.md end to end through the real binary. Events are
//! streamed over HTTP (out of order, days late, redelivered, filtered, malformed), batch runs
//! (`lambda-ctl run orders --wait`, another process) happen at random points — one while
//! events are ingested and views queried —, the server is killed with SIGKILL and restarted
//! once, and at every check every view of every window kind equals the oracle computed over
//! the acknowledged events, with `as_of.batch_run` naming the latest run. Finally `verify`
//! confirms both engines agree on the archive. On SQLite, and on PostgreSQL state when
//! `LAMBDA_TEST_POSTGRES` is set (a fresh database per test; unreachable = failure); on a
//! local lake, and on the S3 server (`LAMBDA_TEST_S3`, with PostgreSQL state when set) and
//! Azurite (`LAMBDA_TEST_AZURE`): the same test, only lambda.yaml differs. On every lake the
//! dead letters land in the store and garbage collection deletes replaced view versions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lakes::TestLake;
use crate::orders::{Ev, check_views, events, get_view, project, send, wait_for_count};
use crate::state::TempDatabase;
use crate::support::{Rng, Server};

pub const VIEWS: [&str; 4] = ["by_country", "hop", "sessions", "overall"];

/// `lambda-ctl run orders --wait` in its own process; returns the run id it printed.
pub async fn run_batch(project: &Path) -> String {
    let project: PathBuf = project.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
            .args(["run", "orders", "--wait", "--project"])
            .arg(&project)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run lambda-ctl run")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "lambda-ctl run failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("succeeded"),
        "--wait reports the outcome: {stderr}"
    );
    let id = stdout.lines().next().unwrap_or_default().trim().to_string();
    assert!(id.parse::<i64>().is_ok(), "run id on stdout: {stdout:?}");
    id
}

/// Waits until every view is served from run `id`'s publication.
pub async fn wait_for_batch(client: &reqwest::Client, server: &Server, id: &str) {
    let start = Instant::now();
    for view in VIEWS {
        loop {
            let v = get_view(client, server, view).await;
            if v["as_of"]["batch_run"].as_str() == Some(id) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "view {view} still served from batch run {} 3 s after run {id} finished",
                v["as_of"]["batch_run"]
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

pub fn kept(acked: &[Ev]) -> u64 {
    acked.iter().filter(|e| e.amount >= 0.0).count() as u64
}

/// Makes every publication look [`lambda_ctl::batch::GRACE`] old, so the next run collects the
/// versions they replaced.
async fn age_publications(project: &Path, state_url: Option<&str>) {
    use sqlx::Connection;
    let old = chrono::Utc::now() - lambda_ctl::batch::GRACE - chrono::TimeDelta::minutes(1);
    match state_url {
        Some(url) => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("UPDATE publications SET published_at = $1")
                .bind(old)
                .execute(&mut c)
                .await
                .unwrap();
        }
        None => {
            let url = format!("sqlite://{}", project.join(".lambda/state.db").display());
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("UPDATE publications SET published_at = ?")
                .bind(old)
                .execute(&mut c)
                .await
                .unwrap();
        }
    }
}

/// The run ids with files under each view's directory in the lake.
async fn view_runs(lake: &TestLake) -> Vec<(String, Vec<String>)> {
    let lake = lake.open();
    let mut out = Vec::new();
    for view in VIEWS {
        let prefix = lambda_ctl::lake::view_prefix("orders", view);
        let mut runs: Vec<String> = lake
            .list(&prefix)
            .await
            .unwrap()
            .iter()
            .filter_map(|f| f.path.strip_prefix(&prefix)?.strip_prefix("run="))
            .filter_map(|rest| rest.split('/').next())
            .map(str::to_string)
            .collect();
        runs.sort_by_key(|r| r.parse::<i64>().unwrap_or(i64::MAX));
        runs.dedup();
        out.push((view.to_string(), runs));
    }
    out
}

/// The test on `lake` with the state DB at `state_url` (SQLite when `None`), `extra` keys
/// appended to the pipeline file.
async fn lambda(seed: u64, state_url: Option<&str>, lake: &TestLake, extra: &str) {
    let dir = project();
    if !extra.is_empty() {
        let file = dir.path().join("pipelines/orders.yaml");
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}{extra}")).unwrap();
    }
    let mut settings = lake.yaml();
    if let Some(url) = state_url {
        settings.push_str(&format!("state: {url}\n"));
    }
    // `as_of` answers reach back one second: GC keeps no replaced version for them.
    settings.push_str("serve:\n  history: 1s\n");
    std::fs::write(dir.path().join("lambda.yaml"), settings).unwrap();
    let client = reqwest::Client::new();
    let mut rng = Rng(seed);
    let evs = events(&mut rng, 1800, seed as usize * 100_000);
    let a = 300 + rng.below(500) as usize;
    let b = a + 300 + rng.below(500) as usize;

    // Speed only, then a first (full) batch run.
    let server = Server::start(dir.path());
    let mut acked = send(&client, &server, &mut rng, &evs[..a]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    let run1 = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run1).await;
    check_views(&client, &server, &acked).await;

    // A batch run racing ingest and queries.
    let project_dir = dir.path().to_path_buf();
    let racing = tokio::spawn(async move { run_batch(&project_dir).await });
    tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
    acked.extend(send(&client, &server, &mut rng, &evs[a..b]).await);
    for view in VIEWS {
        // Mid-race answers never count an event twice.
        let v = get_view(&client, &server, view).await;
        if view == "overall" {
            let n = v["rows"][0]["n"].as_u64().unwrap_or(0);
            assert!(n <= kept(&acked), "counted {n} of {} events", kept(&acked));
        }
    }
    let run2 = racing.await.unwrap();
    wait_for_batch(&client, &server, &run2).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    check_views(&client, &server, &acked).await;

    // Crash and restart: the published view is served again from the start.
    server.kill9();
    let server = Server::start(dir.path());
    wait_for_batch(&client, &server, &run2).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    check_views(&client, &server, &acked).await;

    // More events, a last (incremental) run, after the grace period of the versions run 2
    // replaced: run 1's files are collected, run 2's (current until run 3 publishes) are kept.
    acked.extend(send(&client, &server, &mut rng, &evs[b..]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    for (view, runs) in view_runs(lake).await {
        assert!(
            runs.contains(&run1),
            "{}: {view} before GC: {runs:?}",
            lake.name
        );
    }
    age_publications(dir.path(), state_url).await;
    // And after serve.history: no `as_of` answer reads run 1's version any more.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let run3 = run_batch(dir.path()).await;
    for (view, runs) in view_runs(lake).await {
        assert_eq!(
            runs,
            vec![run2.clone(), run3.clone()],
            "{}: {view} after GC",
            lake.name
        );
    }
    // Malformed lines went to the dead letters, in the lake.
    let dead = lake
        .open()
        .list(&lambda_ctl::lake::dead_letters_prefix("orders"))
        .await
        .unwrap();
    assert!(
        !dead.is_empty(),
        "{}: no dead letters in the lake",
        lake.name
    );
    wait_for_batch(&client, &server, &run3).await;
    check_views(&client, &server, &acked).await;
    for view in VIEWS {
        let v = get_view(&client, &server, view).await;
        assert_eq!(v["as_of"]["batch_run"].as_str(), Some(run3.as_str()));
        assert!(v["as_of"]["batch_rows"].as_u64().unwrap() > 0, "{view}");
    }

    // Every partition archived its own segments, and answers hold every acknowledged event's
    // position, partition by partition.
    let partitions: u32 = extra
        .lines()
        .find_map(|l| l.strip_prefix("partitions: "))
        .map_or(1, |n| n.parse().unwrap());
    let positions = crate::support::eventually(
        "every acknowledged event's position in an answer",
        Duration::from_secs(10),
        || async {
            let v = get_view(&client, &server, "overall").await;
            let positions = v["as_of"]["positions"].as_object().cloned()?;
            let held: u64 = positions
                .values()
                .filter_map(serde_json::Value::as_u64)
                .sum();
            (held == acked.len() as u64).then_some(positions)
        },
    )
    .await;
    assert_eq!(positions.len() as u32, partitions, "{positions:?}");
    let archived: std::collections::BTreeSet<String> = lake
        .open()
        .list(&lambda_ctl::lake::archive_prefix("orders"))
        .await
        .unwrap()
        .iter()
        .filter_map(|o| {
            o.path
                .split('/')
                .find(|p| p.starts_with("p="))
                .map(str::to_string)
        })
        .collect();
    let expected: std::collections::BTreeSet<String> =
        (0..partitions).map(|p| format!("p={p}")).collect();
    assert_eq!(archived, expected, "{}: partitions archived", lake.name);

    // Both engines agree on the archive.
    let out = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["verify", "orders", "--project"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify: {stdout}");
    assert_eq!(stdout.matches(": ok (").count(), VIEWS.len(), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_promise_on_sqlite() {
    for seed in [1, 2, 3] {
        lambda(seed, None, &TestLake::file(), "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_promise_on_postgres() {
    let Some(server) = crate::support::service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let url = db.url.clone();
    let outcome =
        tokio::spawn(async move { lambda(4, Some(&url), &TestLake::file(), "").await }).await;
    db.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The production shape: lake = the S3 server, state = PostgreSQL (SQLite when
/// `LAMBDA_TEST_POSTGRES` is unset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_promise_on_s3() {
    let Some(lake) = TestLake::s3().await else {
        return;
    };
    let db = match crate::support::service("LAMBDA_TEST_POSTGRES") {
        Some(server) => Some(TempDatabase::create(&server).await),
        None => None,
    };
    let url = db.as_ref().map(|d| d.url.clone());
    let outcome = tokio::spawn(async move { lambda(5, url.as_deref(), &lake, "").await }).await;
    if let Some(db) = db {
        db.drop().await;
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_promise_on_azure() {
    let Some(lake) = TestLake::azure().await else {
        return;
    };
    lambda(6, None, &lake, "").await;
}

/// The speed layer in three partitions: events routed by `event_id` (a redelivered copy meets
/// its first copy's de-duplication), then by `user` — each partition with its own log,
/// segments and checkpoint, the batch cutoff a position per partition, through the same kill
/// -9, racing batch runs and `verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_promise_partitioned() {
    lambda(7, None, &TestLake::file(), "partitions: 3\n").await;
    lambda(
        8,
        None,
        &TestLake::file(),
        "partitions: 2\npartition_key: user\n",
    )
    .await;
}
