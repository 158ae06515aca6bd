//! Speed-layer benchmarks through the real binary on loopback (prints figures; not a test):
//! - durable HTTP ingest throughput with concurrent clients (every 200 means fsynced);
//! - ack → visible-in-query latency at a steady rate;
//! - serving: point-query latency and queries/s with a published batch view loaded, over HTTP
//!   and over SQL (`serve.sql`, the PostgreSQL wire protocol: prepared statement, bound key).
//!
//! `cargo bench --bench ingest` (or `just bench`); `INGEST_BENCH_PARTITIONS=N` runs the speed
//! layer in N partitions.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{Serve, ack_to_visible, quantile};

const PIPELINE: &str = r#"
name: clicks
source: {type: http}
schema: {event_id: string, ts: timestamp, page: string, user_id: string, latency_ms: float}
event_time: ts
event_id: event_id
archive: {segment_rows: 1000000, segment_age: 2s}
views:
  - name: page_views
    group_by: [page]
    window: 1m
    metrics: {views: count(), users: approx_count_distinct(user_id), p95: "approx_quantile(latency_ms, 0.95)"}
  - name: total
    window: all
    metrics: {n: count()}
"#;

const CLIENTS: usize = 8;
const BATCH: usize = 2_000;
const THROUGHPUT_SECS: u64 = 10;

fn body(client: usize, batch: usize, n: usize, now_ms: i64) -> String {
    let mut s = String::with_capacity(n * 110);
    for i in 0..n {
        s.push_str(&format!(
            "{{\"event_id\":\"c{client}-{batch}-{i}\",\"ts\":{},\"page\":\"/p/{}\",\"user_id\":\"u{}\",\"latency_ms\":{}.5}}\n",
            now_ms - (i as i64 % 1000),
            i % 50,
            (i * 7919) % 10_000,
            i % 300
        ));
    }
    s
}

fn main() {
    // `INGEST_BENCH_PARTITIONS=N`: the speed layer in N partitions (a log and an aggregator
    // each), events routed by `event_id`.
    let partitions: u32 = std::env::var("INGEST_BENCH_PARTITIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let pipeline = format!("{PIPELINE}partitions: {partitions}\n");
    println!("speed layer in {partitions} partition(s)");
    let server = Serve::start_with(
        "clicks",
        &pipeline,
        Some("serve:\n  sql: {listen: 127.0.0.1:0}\n"),
        "warn",
    );
    let sql_url = server.sql.clone().expect("serve.sql listens");
    let base = server.base.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{base}/v1/pipelines/clicks/events");
        let now = chrono::Utc::now().timestamp_millis();

        // Throughput: CLIENTS concurrent clients posting BATCH-event requests.
        let bodies: Vec<Vec<String>> = (0..CLIENTS).map(|c| (0..40).map(|b| body(c, b, BATCH, now)).collect()).collect();
        let deadline = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (c, mine) in bodies.into_iter().enumerate() {
            let (http, url) = (http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                let mut round = 0usize;
                while Instant::now() < deadline {
                    // Fresh ids per round so nothing is dropped as a duplicate.
                    let b = if round < mine.len() { mine[round].clone() } else { body(c, round, BATCH, now) };
                    let r = http.post(&url).header("content-type", "application/x-ndjson").body(b).send().await.expect("POST");
                    assert!(r.status().is_success(), "POST answered {}", r.status());
                    let v: serde_json::Value = r.json().await.unwrap();
                    sent += v["accepted"].as_u64().unwrap();
                    round += 1;
                }
                sent
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!("durable HTTP ingest: {total} events in {secs:.1} s = {:.0} events/s ({CLIENTS} clients × {BATCH}-event requests, fsync per group commit)", total as f64 / secs);

        // Latency: a steady 10 requests/s of 100 events, once the throughput phase's backlog
        // is visible.
        let lat = ack_to_visible(&server, total, |i| {
            body(99, 100_000 + i, 100, chrono::Utc::now().timestamp_millis())
        })
        .await;
        let p = |q: f64| quantile(&lat, q);
        println!("ack → visible latency at 1000 events/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples, includes one query round trip)", p(0.5), p(0.99), p(1.0), lat.len());

        // Serving: publish a batch view of everything sealed, then point queries.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let run = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
            .args(["run", "clicks", "--wait", "--project"])
            .arg(server.project())
            .env("RUST_LOG", "warn")
            .output()
            .expect("lambda-ctl run");
        assert!(run.status.success(), "batch run failed: {}", String::from_utf8_lossy(&run.stderr));
        let page_url = format!("{base}/v1/views/clicks/page_views?page=/p/7");
        loop {
            let v: serde_json::Value = http.get(&page_url).send().await.unwrap().json().await.unwrap();
            if !v["as_of"]["batch_run"].is_null() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let clients: usize = std::env::var("QUERY_BENCH_CLIENTS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(4);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, url) = (http.clone(), page_url.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = http.get(&url).send().await.unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            }));
        }
        let mut q = Vec::new();
        for t in tasks {
            q.extend(t.await.unwrap());
        }
        q.sort_by(f64::total_cmp);
        let pq = |x: f64| q[((q.len() - 1) as f64 * x) as usize];
        println!("point query with the batch view loaded: p50 {:.2} ms, p99 {:.2} ms, {:.0} queries/s ({clients} clients, 5 s)", pq(0.5), pq(0.99), q.len() as f64 / 5.0);

        // The same point query over SQL: each client a PostgreSQL connection running one prepared
        // statement with the key bound (the extended protocol, as BI drivers use it).
        let clients: usize = std::env::var("SQL_BENCH_CLIENTS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(8);
        let statement = "SELECT window_start, page, views, users, p95 FROM clicks.page_views WHERE page = $1";
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let url = format!("{sql_url}/lambda?user=bench");
            tasks.push(tokio::spawn(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.expect("SQL connection");
                let mut lat = Vec::new();
                let mut rows = 0usize;
                let mut i = c;
                while Instant::now() < deadline {
                    let page = format!("/p/{}", i % 50);
                    i += 1;
                    let t = Instant::now();
                    rows += sqlx::query(statement).bind(&page).fetch_all(&mut conn).await.expect("SQL point query").len();
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                (lat, rows)
            }));
        }
        let (mut q, mut rows) = (Vec::new(), 0);
        for t in tasks {
            let (lat, n) = t.await.unwrap();
            q.extend(lat);
            rows += n;
        }
        assert!(rows > 0, "the SQL point queries found rows");
        q.sort_by(f64::total_cmp);
        let pq = |x: f64| q[((q.len() - 1) as f64 * x) as usize];
        println!("SQL point query (prepared, bound key) with the batch view loaded: p50 {:.2} ms, p99 {:.2} ms, {:.0} queries/s ({clients} clients, 5 s; goal p99 ≤ 5 ms at ≥ 2k q/s with 8)", pq(0.5), pq(0.99), q.len() as f64 / 5.0);
    });
    drop(server);
}
