//! Sink benchmarks (prints figures; not a test):
//! - delivery throughput, rows/s, of each destination's `apply` on its own: a first delivery
//!   of N new rows, then N changed rows, then (PostgreSQL) N deletions — into PostgreSQL
//!   (`LAMBDA_TEST_POSTGRES`, skipped when unset) and as a Parquet and a CSV file on a local
//!   lake (the whole answer written per delivery);
//! - the ack → visible latency of a view through the real binary, without and with sinks on
//!   it (a Parquet file every 100 ms, and a PostgreSQL table when available): what the sinks
//!   add to the path of a query (goal: p99 within 10 ms).
//!
//! `cargo bench --bench sinks`; figures from the dev profile are far below release ones.

use std::collections::BTreeMap;
use std::time::Instant;

use lambda_ctl::lake::Lake;
use lambda_ctl::serving::query::AsOf;
use lambda_ctl::serving::sink::files::FilesTarget;
use lambda_ctl::serving::sink::postgres::PostgresTarget;
use lambda_ctl::serving::sink::rows::{Cell, Kind, Rows, Shape, diff};
use lambda_ctl::serving::sink::{Context, Delivery, Target};
use lambda_ctl::spec::FileFormat;

mod common;
use common::{Serve, ack_to_visible, quantile};

const ROWS: usize = 100_000;

fn shape() -> Shape {
    Shape {
        columns: vec![
            ("window_start".into(), Kind::Time),
            ("window_end".into(), Kind::Time),
            ("page".into(), Kind::Text),
            ("views".into(), Kind::Int),
            ("avg_latency".into(), Kind::Float),
        ],
        key: vec![0, 2],
        all_time: false,
    }
}

/// `n` rows: 100 pages per minute; `round` changes every value.
fn rows(n: usize, round: i64) -> Rows {
    let s = shape();
    (0..n)
        .map(|i| {
            let start = 1_763_719_200_000 + (i / 100) as i64 * 60_000;
            let row = vec![
                Cell::Time(start),
                Cell::Time(start + 60_000),
                Cell::Text(format!("/p/{}", i % 100)),
                Cell::Int(i as i64 + round),
                Cell::float(i as f64 / 7.0 + round as f64),
            ];
            (s.key_of(&row), row)
        })
        .collect()
}

fn as_of() -> AsOf {
    AsOf {
        speed_rows: ROWS as u64,
        speed_segments: 1,
        speed_events: ROWS as u64,
        computed_at: "2026-12-01T00:00:00.000Z".into(),
        ..AsOf::default()
    }
}

/// Times the deliveries through `target`: N new rows, the same N rows changed, and (`deletes`)
/// all N gone. A file is rewritten whole each time: its figure is rows written per second.
async fn deliveries(name: &str, target: &mut dyn Target, deletes: bool) {
    let t = Instant::now();
    target.open().await.expect("open the destination");
    println!("{name}: open {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
    let empty = Rows::new();
    let first = rows(ROWS, 0);
    let second = rows(ROWS, 1);
    let as_of = as_of();
    let steps = [
        ("insert", &empty, &first),
        ("update", &first, &second),
        ("delete", &second, &empty),
    ];
    for (what, before, after) in steps.into_iter().take(if deletes { 3 } else { 2 }) {
        let d = diff(before, after);
        let t = Instant::now();
        target
            .apply(&Delivery {
                diff: &d,
                rows: after,
                as_of: &as_of,
            })
            .await
            .expect("deliver");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{name}: {what} {ROWS} rows in {:.0} ms = {:.0} rows/s",
            secs * 1000.0,
            ROWS as f64 / secs
        );
    }
}

const PIPELINE: &str = r#"
name: clicks
source: {type: http}
schema: {event_id: string, ts: timestamp, page: string, latency_ms: float}
event_time: ts
event_id: event_id
archive: {segment_rows: 1000000, segment_age: 2s}
views:
  - name: page_views
    group_by: [page]
    window: 1m
    metrics: {views: count(), avg_latency: avg(latency_ms)}
  - name: total
    window: all
    metrics: {n: count()}
"#;

/// p50 and p99 (ms) of ack → visible on the `total` view at 10 requests/s of 100 events.
async fn latency(server: &Serve) -> (f64, f64) {
    let lat = ack_to_visible(server, 0, |i| {
        let now = chrono::Utc::now().timestamp_millis();
        (0..100)
            .map(|j| {
                format!(
                    "{{\"event_id\":\"{i}-{j}\",\"ts\":{now},\"page\":\"/p/{}\",\"latency_ms\":{j}.5}}\n",
                    j % 50
                )
            })
            .collect()
    })
    .await;
    (quantile(&lat, 0.5), quantile(&lat, 0.99))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = std::env::var("LAMBDA_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty());
    rt.block_on(async {
        // Delivery throughput, destination by destination.
        let dir = tempfile::tempdir().unwrap();
        let lake_url = format!("file://{}", dir.path().display());
        let ctx = Context {
            lake: Lake::open(&lake_url, &BTreeMap::new()).unwrap(),
            lake_url,
            lake_options: BTreeMap::new(),
        };
        for format in [FileFormat::Parquet, FileFormat::Csv] {
            let path = format!("exports/bench.{}", format.extension());
            let mut t =
                FilesTarget::new(&path, format, &BTreeMap::new(), "clicks.bench", shape(), &ctx)
                    .unwrap();
            deliveries(&format!("files ({})", format.extension()), &mut t, false).await;
        }
        match &pg {
            Some(url) => {
                let table = format!("sink_bench_{}", std::process::id());
                let mut t = PostgresTarget::new(url, &table, "clicks.bench", shape());
                deliveries("postgres", &mut t, true).await;
                let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                    .await
                    .unwrap();
                for sql in [
                    format!("DROP TABLE {table}"),
                    format!("DELETE FROM lambda_sink_progress WHERE sink = '{table}'"),
                ] {
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut c)
                        .await
                        .unwrap();
                }
            }
            None => println!("postgres: skipped (LAMBDA_TEST_POSTGRES is not set)"),
        }

        // What sinks add to ack → visible.
        let plain = Serve::start("clicks", PIPELINE, "error");
        let (p50, p99) = latency(&plain).await;
        drop(plain);
        println!("ack → visible without sinks: p50 {p50:.2} ms, p99 {p99:.2} ms");
        let mut sinks = String::from(
            "    sinks:\n      - {type: files, path: exports/total.parquet, every: 100ms}\n",
        );
        if pg.is_some() {
            sinks.push_str(&format!(
                "      - {{type: postgres, url: \"${{LAMBDA_TEST_POSTGRES}}\", table: sink_bench_total_{}, every: 100ms}}\n",
                std::process::id()
            ));
        }
        let with = Serve::start("clicks", &format!("{PIPELINE}{sinks}"), "error");
        let (p50, p99) = latency(&with).await;
        drop(with);
        println!(
            "ack → visible with sinks on the view ({}): p50 {p50:.2} ms, p99 {p99:.2} ms",
            if pg.is_some() {
                "Parquet file + PostgreSQL table, every 100 ms"
            } else {
                "Parquet file, every 100 ms"
            }
        );
        if let Some(url) = &pg {
            let table = format!("sink_bench_total_{}", std::process::id());
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            for sql in [
                format!("DROP TABLE IF EXISTS {table}"),
                format!("DELETE FROM lambda_sink_progress WHERE sink = '{table}'"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    });
}
