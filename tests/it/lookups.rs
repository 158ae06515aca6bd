//! Lookups (reference data) through the real binary: events enriched with a table, in both
//! layers alike, equal to an oracle — plain loops over the acknowledged events and the table
//! versions each was enriched with.
//!
//! - A table refreshed between two batches of events: the speed layer enriches each segment
//!   with one version and records it; after a kill -9 and restart, after `run` and in
//!   `verify`, every segment is computed with the version it recorded (batch == speed). Then
//!   `run --refresh-lookups` restates all of history with the current table. On a local lake
//!   and on the S3 server (`LAMBDA_TEST_S3`).
//! - Effective-dated tables join by event time; `on_missing: reject` dead-letters events
//!   without a row; a refresh that fails (a bad row, a missing file) keeps the version in use
//!   and is counted in `/metrics`.
//! - A PostgreSQL query as the source (`LAMBDA_TEST_POSTGRES`), refreshed from the database.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lambda_ctl::lake::Lake;
use lambda_ctl::state::State;
use serde_json::Value;

use crate::lakes::TestLake;
use crate::state::TempDatabase;
use crate::support::{Server, eventually, get_json, post_events, service, wait_for_sealed};

const NDJSON: &str = "application/x-ndjson";
const T0: i64 = 1_763_719_200_000; // 2025-11-21T10:00:00Z

/// `sales`: events carry a store; the `stores` table gives its region.
fn sales(from: &str) -> String {
    format!(
        r#"name: sales
source: {{type: http}}
schema: {{id: string, ts: timestamp, store: string, amount: int}}
event_time: ts
event_id: id
lookups:
  stores:
    from: {from}
    key: store_id
    on: store
    refresh: 1s
    schema: {{store_id: string, region: string}}
filter: "amount >= 0"
columns:
  region: "coalesce(stores.region, 'none')"
archive: {{segment_rows: 1000, segment_age: 1s}}
views:
  - name: by_region
    group_by: [region]
    window: all
    metrics: {{n: count(), total: sum(amount)}}
  - name: regions
    group_by: [region]
    window: all
    metrics: {{n: count(), total: sum(amount)}}
"#
    )
}

/// A project directory with `pipeline` and a lambda.yaml on `lake`.
fn project(lake: &TestLake, pipeline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/p.yaml"), pipeline).unwrap();
    std::fs::write(dir.path().join("lambda.yaml"), lake.yaml()).unwrap();
    dir
}

/// A sale: (id, event time, store, amount).
type Sale = (String, i64, String, i64);

fn sales_events(prefix: &str, n: usize, stores: &[&str]) -> Vec<Sale> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                T0 + (i as i64) * 1_000,
                stores[i % stores.len()].to_string(),
                // Every seventh is filtered out.
                if i % 7 == 6 { -1 } else { (i % 13) as i64 + 1 },
            )
        })
        .collect()
}

fn ndjson(evs: &[Sale]) -> String {
    evs.iter()
        .map(|(id, ts, store, amount)| {
            format!(r#"{{"id":"{id}","ts":{ts},"store":"{store}","amount":{amount}}}"#) + "\n"
        })
        .collect()
}

/// The oracle: region → (count, total) of `evs`, each batch with its table.
fn oracle(batches: &[(&[Sale], &BTreeMap<&str, &str>)]) -> BTreeMap<String, (u64, i64)> {
    let mut out: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for (evs, table) in batches {
        for (_, _, store, amount) in evs.iter().filter(|e| e.3 >= 0) {
            let region = table.get(store.as_str()).copied().unwrap_or("none");
            let e = out.entry(region.to_string()).or_default();
            e.0 += 1;
            e.1 += amount;
        }
    }
    out
}

/// The rows of `pipeline.view` keyed by `key`: (n, total), and the answer's batch run.
async fn served(
    client: &reqwest::Client,
    server: &Server,
    pipeline: &str,
    view: &str,
    key: &str,
    total: &str,
) -> (BTreeMap<String, (u64, i64)>, Option<String>) {
    let v = get_json(client, server.url(&format!("/v1/views/{pipeline}/{view}"))).await;
    let rows = v["rows"].as_array().unwrap_or_else(|| panic!("{v}"));
    let map = rows
        .iter()
        .map(|r| {
            let total = r[total]
                .as_i64()
                .or_else(|| r[total].as_f64().map(|f| f.round() as i64))
                .unwrap_or_else(|| panic!("{r}"));
            (
                r[key].as_str().unwrap_or_else(|| panic!("{r}")).to_string(),
                (r["n"].as_u64().unwrap(), total),
            )
        })
        .collect();
    (map, v["as_of"]["batch_run"].as_str().map(String::from))
}

/// Waits until the served rows equal `want`.
async fn wait_for_rows(
    client: &reqwest::Client,
    server: &Server,
    (pipeline, view, key, total): (&str, &str, &str, &str),
    want: &BTreeMap<String, (u64, i64)>,
) {
    let mut last = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        last = served(client, server, pipeline, view, key, total).await.0;
        if &last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{pipeline}.{view} serves {last:?}, the oracle says {want:?}");
}

/// The pipeline's entry of `GET /v1/pipelines`.
async fn status(client: &reqwest::Client, server: &Server, pipeline: &str) -> Value {
    let all = get_json(client, server.url("/v1/pipelines")).await;
    all["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pipeline)
        .cloned()
        .unwrap_or_else(|| panic!("{all}"))
}

/// Waits until lookup 0 of `pipeline` is at a version other than `old` (its first one when
/// `old` is None); returns it.
async fn wait_for_version(
    client: &reqwest::Client,
    server: &Server,
    pipeline: &str,
    old: Option<&str>,
) -> String {
    eventually(
        "the lookup's version changes",
        Duration::from_secs(15),
        || async move {
            let p = status(client, server, pipeline).await;
            let v = p["lookups"][0]["version"].as_str()?.to_string();
            (Some(v.as_str()) != old).then_some(v)
        },
    )
    .await
}

/// `lambda-ctl ARGS --project DIR`, which must succeed; its stdout and stderr.
fn lambda(project: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(args)
        .arg("--project")
        .arg(project)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "lambda-ctl {args:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// `run PIPELINE --wait [EXTRA]` in another process; the run id.
async fn run_batch(project: &Path, pipeline: &str, extra: &[&str]) -> String {
    let (project, mut args) = (project.to_path_buf(), vec!["run", pipeline, "--wait"]);
    args.extend_from_slice(extra);
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let (stdout, _) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lambda(&project, &args)
    })
    .await
    .unwrap();
    stdout.lines().next().unwrap_or_default().trim().to_string()
}

/// Waits until `pipeline.view` is served from batch run `id`.
async fn wait_for_batch(client: &reqwest::Client, server: &Server, path: &str, id: &str) {
    eventually(
        "the run's publication is served",
        Duration::from_secs(5),
        || async move {
            let v = get_json(client, server.url(path)).await;
            (v["as_of"]["batch_run"].as_str() == Some(id)).then_some(())
        },
    )
    .await
}

/// The restatement ledger of `sales.view` records what run `run`'s publication changed: every
/// region whose (n, total) differs between `before` and `after`, with both values (null for a
/// row that did not exist), and nothing else.
async fn assert_ledger(
    client: &reqwest::Client,
    server: &Server,
    view: &str,
    run: &str,
    before: &BTreeMap<String, (u64, i64)>,
    after: &BTreeMap<String, (u64, i64)>,
) {
    let path = format!("/v1/views/sales/{view}/restatements");
    let entries = eventually(
        "the publication's restated rows in the ledger",
        Duration::from_secs(5),
        || async {
            let ledger = get_json(client, server.url(&path)).await;
            let entries: Vec<Value> = ledger["restatements"]
                .as_array()?
                .iter()
                .filter(|e| e["publication"]["run_id"].as_i64() == run.parse().ok())
                .cloned()
                .collect();
            (!entries.is_empty()).then_some(entries)
        },
    )
    .await;
    let value = |row: Option<&(u64, i64)>| match row {
        Some((n, total)) => (Value::from(*n), Value::from(*total)),
        None => (Value::Null, Value::Null),
    };
    let mut recorded = BTreeMap::new();
    for e in &entries {
        assert_eq!(e["cause"], "publication", "{e}");
        assert!(e["window_start"].is_null(), "an all-time row: {e}");
        let m = &e["metrics"];
        recorded.insert(
            e["key"]["region"].as_str().unwrap().to_string(),
            (
                (m["n"]["before"].clone(), m["total"]["before"].clone()),
                (m["n"]["after"].clone(), m["total"]["after"].clone()),
            ),
        );
    }
    let expected: BTreeMap<String, _> = before
        .keys()
        .chain(after.keys())
        .filter(|r| before.get(*r) != after.get(*r))
        .map(|r| (r.clone(), (value(before.get(r)), value(after.get(r)))))
        .collect();
    assert_eq!(recorded, expected, "{view}: {entries:#?}");
}

fn verify(project: &Path, pipeline: &str) {
    let (stdout, _) = lambda(project, &["verify", pipeline]);
    assert!(!stdout.contains("DIFFERS"), "{stdout}");
}

async fn put(lake: &Lake, path: &str, text: &str) {
    lake.put(path, text.as_bytes().to_vec()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_table_is_recorded_per_segment_and_restated_only_when_asked() {
    let mut lakes = vec![TestLake::file()];
    lakes.extend(TestLake::s3().await);
    for lake in lakes {
        refresh_keeps_batch_equal_to_speed(&lake).await;
    }
}

async fn refresh_keeps_batch_equal_to_speed(test_lake: &TestLake) {
    let dir = project(test_lake, &sales("reference/stores.csv"));
    let lake = test_lake.open();
    let v1: BTreeMap<&str, &str> = [("s1", "north"), ("s2", "south"), ("s3", "east")].into();
    let v2: BTreeMap<&str, &str> = [("s1", "west"), ("s2", "south"), ("s9", "north")].into();
    put(
        &lake,
        "reference/stores.csv",
        "store_id,region\ns1,north\ns2,south\ns3,east\n",
    )
    .await;
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let first = wait_for_version(&client, &server, "sales", None).await;
    let key = ("sales", "by_region", "region", "total");

    let a = sales_events("a", 60, &["s1", "s2", "s3", "s9"]);
    post_events(
        &client,
        server.url("/v1/pipelines/sales/events"),
        NDJSON,
        ndjson(&a),
    )
    .await;
    wait_for_rows(&client, &server, key, &oracle(&[(&a, &v1)])).await;
    wait_for_sealed(&client, &server, "sales", 1).await;

    // The table changes: the next segment is enriched with the new version, the sealed one
    // keeps its own.
    put(
        &lake,
        "reference/stores.csv",
        "store_id,region\ns1,west\ns2,south\ns9,north\n",
    )
    .await;
    let second = wait_for_version(&client, &server, "sales", Some(&first)).await;
    let b = sales_events("b", 45, &["s1", "s2", "s3", "s9"]);
    post_events(
        &client,
        server.url("/v1/pipelines/sales/events"),
        NDJSON,
        ndjson(&b),
    )
    .await;
    let mixed = oracle(&[(&a, &v1), (&b, &v2)]);
    wait_for_rows(&client, &server, key, &mixed).await;
    let sealed = wait_for_sealed(&client, &server, "sales", 2).await;

    // Each segment recorded the one version it was enriched with; both are in the lake.
    let spec = lambda_ctl::spec::load(dir.path()).unwrap();
    let state = State::open(&spec.settings.state).await.unwrap();
    let segments = state.segments("sales").await.unwrap();
    assert_eq!(segments.len() as u64, sealed);
    let recorded: Vec<String> = segments
        .iter()
        .map(|s| s.lookups.clone().expect("versions recorded"))
        .collect();
    assert!(recorded.first().unwrap().contains(&first), "{recorded:?}");
    assert!(recorded.last().unwrap().contains(&second), "{recorded:?}");
    for v in [&first, &second] {
        assert!(
            lake.exists(&format!("lookups/sales/stores/{v}.parquet"))
                .await
                .unwrap(),
            "version {v} in the lake"
        );
    }

    // A restart rebuilds the sealed segments with their recorded versions.
    server.kill9();
    let server = Server::start(dir.path());
    wait_for_rows(&client, &server, key, &mixed).await;

    // The batch layer recomputes each segment with the versions it recorded: batch == speed.
    let id = run_batch(dir.path(), "sales", &[]).await;
    wait_for_batch(&client, &server, "/v1/views/sales/by_region", &id).await;
    wait_for_rows(&client, &server, key, &mixed).await;
    verify(dir.path(), "sales");

    // `--refresh-lookups` restates history with today's table, for good: the segments now
    // record it, so a later full recompute and `verify` agree with it. Restricted to one
    // view, the run leaves the other computed with the old versions…
    let id = run_batch(
        dir.path(),
        "sales",
        &["--refresh-lookups", "--views", "by_region"],
    )
    .await;
    wait_for_batch(&client, &server, "/v1/views/sales/by_region", &id).await;
    let restated = oracle(&[(&a, &v2), (&b, &v2)]);
    wait_for_rows(&client, &server, key, &restated).await;
    assert_ledger(&client, &server, "by_region", &id, &mixed, &restated).await;
    let other = ("sales", "regions", "region", "total");
    wait_for_rows(&client, &server, other, &mixed).await;
    // …which the next run, of any kind, recomputes from every segment (as after a refresh
    // that failed or was killed before it published).
    let next = run_batch(dir.path(), "sales", &[]).await;
    wait_for_batch(&client, &server, "/v1/views/sales/regions", &next).await;
    wait_for_rows(&client, &server, other, &restated).await;
    assert_ledger(&client, &server, "regions", &next, &mixed, &restated).await;
    let log = lambda(dir.path(), &["logs", &next]).0;
    assert!(
        log.contains("view regions: full") && log.contains("view by_region: incremental"),
        "only the view computed before the restatement is recomputed: {log}"
    );
    for s in state.segments("sales").await.unwrap() {
        assert!(
            s.lookups.as_deref().is_some_and(|l| l.contains(&second)),
            "{s:?}"
        );
    }
    let log = lambda(dir.path(), &["logs", &id]).0;
    assert!(
        log.contains("--refresh-lookups") && log.contains(&second),
        "the run logs the versions it used: {log}"
    );
    let id = run_batch(dir.path(), "sales", &["--full"]).await;
    wait_for_batch(&client, &server, "/v1/views/sales/by_region", &id).await;
    wait_for_rows(&client, &server, key, &restated).await;
    verify(dir.path(), "sales");
    state.close().await;
}

/// `prices`: the rate of a sku as of the event's time; events without one are rejected.
const PRICES: &str = r#"name: prices
source: {type: http}
schema: {id: string, ts: timestamp, sku: string, qty: int}
event_time: ts
lookups:
  rates:
    from: reference/rates.csv
    key: sku
    on: sku
    refresh: 1s
    on_missing: reject
    valid_from: since
    valid_to: until
    schema: {sku: string, rate: float, since: timestamp, until: timestamp}
columns:
  revenue: "qty * rates.rate"
archive: {segment_rows: 1000, segment_age: 1s}
views:
  - name: by_sku
    group_by: [sku]
    window: all
    metrics: {n: count(), total: sum(revenue)}
"#;

/// `a` costs 1 before T0 + 1 h and 2 from then on; `b` costs 10 from T0 on.
const RATES: &str = "sku,rate,since,until\n\
    a,1,,2025-11-21T11:00:00Z\n\
    a,2,2025-11-21T11:00:00Z,\n\
    b,10,2025-11-21T10:00:00Z,\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effective_dated_rejecting_lookup_and_a_failed_refresh() {
    let test_lake = TestLake::file();
    let dir = project(&test_lake, PRICES);
    let lake = test_lake.open();
    put(&lake, "reference/rates.csv", RATES).await;
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let version = wait_for_version(&client, &server, "prices", None).await;
    let hour = 3_600_000;
    let line = |id: &str, ts: i64, sku: &str, qty: i64| {
        format!(r#"{{"id":"{id}","ts":{ts},"sku":"{sku}","qty":{qty}}}"#) + "\n"
    };
    // (sku, ts, qty): the rate in force at ts, or rejected.
    let body = [
        line("1", T0 + hour - 1, "a", 3), // 1 → 3
        line("2", T0 + hour, "a", 3),     // 2 → 6
        line("3", T0 + 5 * hour, "a", 1), // 2 → 2
        line("4", T0 - 2 * hour, "a", 4), // 1 → 4 (open start)
        line("5", T0 + 1, "b", 2),        // 10 → 20
        line("6", T0 - 1, "b", 1),        // before b's first period: rejected
        line("7", T0, "c", 1),            // no such sku: rejected
    ]
    .concat();
    let r = post_events(
        &client,
        server.url("/v1/pipelines/prices/events"),
        NDJSON,
        body,
    )
    .await;
    // The door accepts them all: a lookup judges events in the plan, by the segment's version.
    assert_eq!(r["accepted"], 7, "{r}");
    let key = ("prices", "by_sku", "sku", "total");
    let want: BTreeMap<String, (u64, i64)> =
        [("a".to_string(), (4, 15)), ("b".to_string(), (1, 20))].into();
    wait_for_rows(&client, &server, key, &want).await;
    eventually("2 rejected", Duration::from_secs(5), || async {
        (status(&client, &server, "prices").await["rejected"] == 2).then_some(())
    })
    .await;
    wait_for_sealed(&client, &server, "prices", 1).await;
    // The rejected events are in the dead-letter area with their reason.
    let letters = eventually("dead letters written", Duration::from_secs(5), || async {
        let mut text = String::new();
        for o in lake.list("dead_letters/prices/").await.ok()? {
            text.push_str(&String::from_utf8_lossy(&lake.get(&o.path).await.ok()?));
        }
        (text.lines().count() == 2).then_some(text)
    })
    .await;
    let mut reasons: Vec<(String, String)> = letters
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["event"]["id"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (
                "6".to_string(),
                "no row of lookup `rates` for `sku` = \"b\" (on_missing: reject)".to_string()
            ),
            (
                "7".to_string(),
                "no row of lookup `rates` for `sku` = \"c\" (on_missing: reject)".to_string()
            ),
        ]
    );

    // A refresh that fails keeps the version in use, is counted, and stops nothing.
    put(
        &lake,
        "reference/rates.csv",
        "sku,rate,since,until\na,cheap,,\n",
    )
    .await;
    eventually(
        "a failed refresh counted",
        Duration::from_secs(10),
        || async {
            let p = status(&client, &server, "prices").await;
            (p["lookups"][0]["refresh_failures"].as_u64() >= Some(1)).then_some(())
        },
    )
    .await;
    lake.delete("reference/rates.csv").await.unwrap();
    let failures = eventually(
        "a missing table counted",
        Duration::from_secs(10),
        || async {
            let p = status(&client, &server, "prices").await;
            let n = p["lookups"][0]["refresh_failures"].as_u64()?;
            (n >= 2).then_some(n)
        },
    )
    .await;
    let p = status(&client, &server, "prices").await;
    assert_eq!(p["lookups"][0]["version"], version.as_str(), "{p}");
    let r = post_events(
        &client,
        server.url("/v1/pipelines/prices/events"),
        NDJSON,
        line("8", T0 + 2 * hour, "a", 5), // still rate 2 → 10
    )
    .await;
    assert_eq!(r["accepted"], 1, "{r}");
    let want: BTreeMap<String, (u64, i64)> =
        [("a".to_string(), (5, 25)), ("b".to_string(), (1, 20))].into();
    wait_for_rows(&client, &server, key, &want).await;
    let metrics = server.metrics(&client).await;
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("lambda_lookup_refresh_failures_total{")
                && l.contains("pipeline=\"prices\"")
                && l.contains("lookup=\"rates\"")
        })
        .unwrap_or_else(|| panic!("no failure counter in /metrics:\n{metrics}"));
    let n: f64 = counted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= failures as f64, "{counted}");

    // Both layers: the batch recompute with the recorded version equals the speed layer.
    wait_for_sealed(&client, &server, "prices", 2).await;
    let id = run_batch(dir.path(), "prices", &[]).await;
    wait_for_batch(&client, &server, "/v1/views/prices/by_sku", &id).await;
    wait_for_rows(&client, &server, key, &want).await;
    verify(dir.path(), "prices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_query_is_a_lookup_source() {
    use sqlx::Connection;
    let Some(pg) = service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let db = TempDatabase::create(&pg).await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for sql in [
        "CREATE TABLE stores (store_id text PRIMARY KEY, region text, opened timestamptz)",
        "INSERT INTO stores VALUES ('s1', 'north', now()), ('s2', 'south', now()), ('s3', 'east', NULL)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let from = format!(
        "{{postgres: {{url: \"{}\", query: \"SELECT store_id, region FROM stores\"}}}}",
        db.url
    );
    let test_lake = TestLake::file();
    let dir = project(&test_lake, &sales(&from));
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let first = wait_for_version(&client, &server, "sales", None).await;
    let key = ("sales", "by_region", "region", "total");
    let v1: BTreeMap<&str, &str> = [("s1", "north"), ("s2", "south"), ("s3", "east")].into();
    let v2: BTreeMap<&str, &str> = [("s1", "north"), ("s2", "west"), ("s3", "east")].into();
    let a = sales_events("a", 30, &["s1", "s2", "s3", "s4"]);
    post_events(
        &client,
        server.url("/v1/pipelines/sales/events"),
        NDJSON,
        ndjson(&a),
    )
    .await;
    wait_for_rows(&client, &server, key, &oracle(&[(&a, &v1)])).await;
    wait_for_sealed(&client, &server, "sales", 1).await;

    sqlx::query("UPDATE stores SET region = 'west' WHERE store_id = 's2'")
        .execute(&mut conn)
        .await
        .unwrap();
    let second = wait_for_version(&client, &server, "sales", Some(&first)).await;
    let b = sales_events("b", 30, &["s1", "s2", "s3", "s4"]);
    post_events(
        &client,
        server.url("/v1/pipelines/sales/events"),
        NDJSON,
        ndjson(&b),
    )
    .await;
    let mixed = oracle(&[(&a, &v1), (&b, &v2)]);
    wait_for_rows(&client, &server, key, &mixed).await;
    wait_for_sealed(&client, &server, "sales", 2).await;

    // The query fails from now on: the version in use stays, ingest goes on.
    sqlx::query("DROP TABLE stores")
        .execute(&mut conn)
        .await
        .unwrap();
    eventually(
        "a failed refresh counted",
        Duration::from_secs(10),
        || async {
            let p = status(&client, &server, "sales").await;
            (p["lookups"][0]["refresh_failures"].as_u64() >= Some(1)).then_some(())
        },
    )
    .await;
    assert_eq!(
        status(&client, &server, "sales").await["lookups"][0]["version"],
        second.as_str()
    );
    let c = sales_events("c", 10, &["s2"]);
    post_events(
        &client,
        server.url("/v1/pipelines/sales/events"),
        NDJSON,
        ndjson(&c),
    )
    .await;
    let all = oracle(&[(&a, &v1), (&b, &v2), (&c, &v2)]);
    wait_for_rows(&client, &server, key, &all).await;
    wait_for_sealed(&client, &server, "sales", 3).await;

    let id = run_batch(dir.path(), "sales", &[]).await;
    wait_for_batch(&client, &server, "/v1/views/sales/by_region", &id).await;
    wait_for_rows(&client, &server, key, &all).await;
    verify(dir.path(), "sales");
    drop(server);
    conn.close().await.unwrap();
    db.drop().await;
}
