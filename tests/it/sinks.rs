//! Sinks (`sinks:` on a view) through the real binary: the `orders` pipeline (events out of
//! order, days late, redelivered, malformed) delivers its views to PostgreSQL tables
//! (`LAMBDA_TEST_POSTGRES`), Kafka topics (`LAMBDA_TEST_KAFKA`) and Parquet/CSV files (the local
//! lake, and the S3 server of `LAMBDA_TEST_S3`); batch runs restate the windows, `serve` is
//! killed with SIGKILL while it delivers and restarted — and every destination equals the HTTP
//! view, row for row and value for value. A destination that is down blocks nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;

use crate::lambda::{VIEWS, kept, run_batch, wait_for_batch};
use crate::orders::{self, Ev, events, send, wait_for_count};
use crate::support::{Rng, Server, get_json, service};

/// A name no other test (or earlier run) uses: lowercase, digits and `_`.
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// The `orders` pipeline with `sinks` (a YAML list item per sink, as one line each) added to
/// the views named.
fn pipeline_with_sinks(sinks: &[(&str, Vec<String>)]) -> String {
    let mut text = orders::PIPELINE.to_string();
    for (view, items) in sinks {
        let start = text
            .find(&format!("  - name: {view}\n"))
            .unwrap_or_else(|| panic!("view {view} in the orders pipeline"));
        let end = text[start + 4..]
            .find("  - name: ")
            .map_or(text.len(), |i| start + 4 + i);
        let mut block = String::from("    sinks:\n");
        for item in items {
            block.push_str(&format!("      - {item}\n"));
        }
        text.insert_str(end, &block);
    }
    text
}

fn project(sinks: &[(&str, Vec<String>)]) -> tempfile::TempDir {
    let dir = orders::project();
    std::fs::write(
        dir.path().join("pipelines/orders.yaml"),
        pipeline_with_sinks(sinks),
    )
    .unwrap();
    dir
}

/// A value both sides can be compared in: times as epoch milliseconds and every number as a
/// float (a count is `3` in one and `3.0` in another). Numbers must have been read exactly
/// ([`exact_row`]).
fn norm_value(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::from(n.as_f64().unwrap()),
        Value::String(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::from(t.timestamp_millis() as f64),
            Err(_) => v.clone(),
        },
        other => other.clone(),
    }
}

/// Rows in comparable form, sorted: each row's columns (but `as_of`) normalized.
fn norm_rows<'a>(rows: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    let mut out: Vec<String> = rows
        .into_iter()
        .map(|r| {
            let obj: BTreeMap<&str, Value> = r
                .as_object()
                .expect("a row is an object")
                .iter()
                .filter(|(k, _)| k.as_str() != "as_of")
                .map(|(k, v)| (k.as_str(), norm_value(v)))
                .collect();
            serde_json::to_string(&obj).unwrap()
        })
        .collect();
    out.sort();
    out
}

/// A flat JSON object (a row) parsed with its numbers read exactly from their text: serde_json's
/// own float parsing may be off by one unit in the last place, which would make equal rows
/// differ (and differing ones look equal).
fn exact_row(text: &str) -> Value {
    let obj: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("a row: {e}: {text}"));
    let obj: serde_json::Map<String, Value> = obj
        .into_iter()
        .map(|(k, raw)| {
            let t = raw.get();
            let v = match t.parse::<f64>() {
                Ok(f) => Value::from(f),
                Err(_) => serde_json::from_str(t).unwrap(),
            };
            (k, v)
        })
        .collect();
    Value::Object(obj)
}

/// The rows of the HTTP view, read exactly.
async fn view_rows(client: &reqwest::Client, server: &Server, view: &str) -> Vec<String> {
    let text = client
        .get(server.url(&format!("/v1/views/orders/{view}")))
        .send()
        .await
        .expect("GET view")
        .text()
        .await
        .unwrap();
    let answer: BTreeMap<String, Box<RawValue>> = serde_json::from_str(&text).unwrap();
    let rows: Vec<Box<RawValue>> = serde_json::from_str(answer["rows"].get()).unwrap();
    let rows: Vec<Value> = rows.iter().map(|r| exact_row(r.get())).collect();
    norm_rows(&rows)
}

/// Waits until `read` (a destination's rows, normalized) equals the HTTP view `view` (the
/// pipeline must be quiet meanwhile); shows both on failure.
async fn wait_equal<F, Fut>(
    what: &str,
    client: &reqwest::Client,
    server: &Server,
    view: &str,
    mut read: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let want = view_rows(client, server, view).await;
        let got = read().await;
        if got == want {
            assert!(!want.is_empty(), "{what}: the view {view} has rows");
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = want.iter().filter(|r| !got.contains(r)).collect();
            let extra: Vec<&String> = got.iter().filter(|r| !want.contains(r)).collect();
            let sinks = sink_statuses(client, server).await;
            panic!(
                "{what} differs from the view {view} after 30 s: {} rows vs {}\nmissing: {missing:#?}\nextra: {extra:#?}\nsinks: {sinks:#?}",
                got.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `sinks` of `/v1/pipelines` for pipeline `orders`.
async fn sink_statuses(client: &reqwest::Client, server: &Server) -> Vec<Value> {
    let all = get_json(client, server.url("/v1/pipelines")).await;
    all["pipelines"][0]["sinks"].as_array().unwrap().clone()
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

mod pg {
    use sqlx::Connection;

    pub async fn connect(url: &str) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("LAMBDA_TEST_POSTGRES is set but unreachable: {e}"))
    }

    pub async fn rows(url: &str, table: &str) -> Vec<serde_json::Value> {
        let mut c = connect(url).await;
        let texts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT to_jsonb(t)::text FROM {table} t"
        )))
        .fetch_all(&mut c)
        .await
        .unwrap_or_default();
        texts.iter().map(|t| super::exact_row(t)).collect()
    }

    pub async fn exec(url: &str, sql: String) {
        let mut c = connect(url).await;
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    }

    /// (seq, rows, as_of) of a sink's progress row.
    pub async fn progress(url: &str, table: &str) -> (i64, i64, serde_json::Value) {
        let mut c = connect(url).await;
        let (seq, rows, as_of): (i64, i64, String) = sqlx::query_as(
            "SELECT seq, rows, as_of::text FROM lambda_sink_progress WHERE sink = $1",
        )
        .bind(table)
        .fetch_one(&mut c)
        .await
        .unwrap();
        (seq, rows, serde_json::from_str(&as_of).unwrap())
    }
}

/// Every view delivered to its own table; ingest, a batch run, kill -9 while delivering,
/// restart, more events and another run: each table equals its view after every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_equal_the_views_across_batch_runs_and_kill9() {
    let Some(url) = service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let tag = unique();
    let tables: Vec<(&str, String)> = VIEWS
        .iter()
        .map(|v| (*v, format!("sink_{v}_{tag}")))
        .collect();
    let sinks: Vec<(&str, Vec<String>)> = tables
        .iter()
        .map(|(v, t)| {
            (
                *v,
                vec![format!(
                    "{{type: postgres, url: \"${{LAMBDA_TEST_POSTGRES}}\", table: {t}, every: 50ms}}"
                )],
            )
        })
        .collect();
    let dir = project(&sinks);
    let client = reqwest::Client::new();
    let mut rng = Rng(19);
    let evs = events(&mut rng, 1800, 0);

    async fn check(
        client: &reqwest::Client,
        server: &Server,
        url: &str,
        tables: &[(&str, String)],
        step: &str,
    ) {
        for (view, table) in tables {
            wait_equal(
                &format!("{step}: table {table}"),
                client,
                server,
                view,
                || async { norm_rows(&pg::rows(url, table).await) },
            )
            .await;
        }
    }

    let server = Server::start(dir.path());
    let mut acked: Vec<Ev> = send(&client, &server, &mut rng, &evs[..600]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    check(&client, &server, &url, &tables, "after ingest").await;
    // Sessions merged by late events: the merged-away rows were deleted.
    let statuses = sink_statuses(&client, &server).await;
    assert_eq!(statuses.len(), VIEWS.len(), "{statuses:?}");
    assert!(statuses.iter().all(|s| s["state"] == "ok"), "{statuses:?}");
    let sessions = statuses.iter().find(|s| s["view"] == "sessions").unwrap();
    assert!(sessions["deleted"].as_u64().unwrap() > 0, "{sessions}");
    let metrics = server.metrics(&client).await;
    assert!(
        metrics.contains(&format!(
            "lambda_sink_lag_seconds{{pipeline=\"orders\",view=\"by_country\",sink=\"postgres:{}\"}}",
            tables[0].1
        )),
        "{metrics}"
    );

    let run1 = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run1).await;
    check(&client, &server, &url, &tables, "after the first batch run").await;

    // Killed while delivering (every 50 ms), twice, at random points.
    let mut server = server;
    for (round, range) in [(1, 600..1000), (2, 1000..1400)] {
        acked.extend(send(&client, &server, &mut rng, &evs[range]).await);
        tokio::time::sleep(Duration::from_millis(rng.below(120))).await;
        server.kill9();
        server = Server::start(dir.path());
        wait_for_count(&client, &server, kept(&acked)).await;
        let step = format!("after kill -9 number {round}");
        check(&client, &server, &url, &tables, &step).await;
    }

    acked.extend(send(&client, &server, &mut rng, &evs[1400..]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    let run2 = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run2).await;
    check(&client, &server, &url, &tables, "after the last batch run").await;

    // The progress row says what the table reflects: run 2's publication (recorded even
    // where it changed no row), and as many rows as the table holds.
    for (view, table) in &tables {
        let (seq, rows, as_of) = crate::support::eventually(
            &format!("{table}: progress reflects run {run2}"),
            Duration::from_secs(10),
            || async {
                let p = pg::progress(&url, table).await;
                (p.2["batch_run"].as_str() == Some(run2.as_str())).then_some(p)
            },
        )
        .await;
        assert!(seq > 1, "{table}: {seq} deliveries; {as_of}");
        assert_eq!(
            rows as usize,
            pg::rows(&url, table).await.len(),
            "{view}: rows recorded with the delivery"
        );
    }
    server.kill9();
    for (_, table) in &tables {
        pg::exec(&url, format!("DROP TABLE {table}")).await;
        pg::exec(
            &url,
            format!("DELETE FROM lambda_sink_progress WHERE sink = '{table}'"),
        )
        .await;
    }
}

/// An existing table whose column has another type than the view's: `serve` does not start,
/// and says which column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_an_incompatible_table_naming_the_column() {
    let Some(url) = service("LAMBDA_TEST_POSTGRES") else {
        return;
    };
    let table = format!("sink_bad_{}", unique());
    pg::exec(
        &url,
        format!(
            "CREATE TABLE {table} (window_start timestamptz, window_end timestamptz, country text, \
             n text, total float8, lo float8, hi float8, mean float8)"
        ),
    )
    .await;
    let dir = project(&[(
        "by_country",
        vec![format!(
            "{{type: postgres, url: \"${{LAMBDA_TEST_POSTGRES}}\", table: {table}}}"
        )],
    )]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["serve", "--listen", "127.0.0.1:0", "--project"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    pg::exec(&url, format!("DROP TABLE {table}")).await;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pipeline `orders`, view `by_country`, sink `postgres:{table}`: column `n` of table \"{table}\" is text, but the view's `n` is bigint"
        )),
        "{stderr}"
    );
}

/// A destination that is down: ingest and queries go on, and the sink reports that it is
/// behind and retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_down_blocks_neither_ingest_nor_queries() {
    let dir = project(&[(
        "overall",
        vec!["{type: postgres, url: \"postgres://lambda@127.0.0.1:9/nowhere\", table: totals, every: 100ms}".into()],
    )]);
    let client = reqwest::Client::new();
    let mut rng = Rng(7);
    let evs = events(&mut rng, 200, 0);
    let server = Server::start(dir.path());
    let started = Instant::now();
    let acked = send(&client, &server, &mut rng, &evs).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ingest and queries took {:?}",
        started.elapsed()
    );
    let statuses = sink_statuses(&client, &server).await;
    assert_eq!(statuses[0]["sink"], "postgres:totals");
    assert_ne!(statuses[0]["state"], "ok", "{statuses:?}");
    assert!(statuses[0]["lag_s"].as_f64().unwrap() > 0.0);
    let metrics = server.metrics(&client).await;
    assert!(
        metrics.contains(
            "lambda_sink_up{pipeline=\"orders\",view=\"overall\",sink=\"postgres:totals\"} 0"
        ),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Files

/// Rows of a Parquet file the sink wrote, as the API writes rows, and its `lambda.as_of`.
fn parquet_rows(bytes: Vec<u8>) -> (Vec<Value>, Option<Value>) {
    use polars::prelude::*;
    let mut reader = ParquetReader::new(std::io::Cursor::new(bytes.clone()));
    let as_of = reader
        .get_metadata()
        .unwrap()
        .key_value_metadata()
        .as_ref()
        .and_then(|kv| kv.iter().find(|kv| kv.key == "lambda.as_of"))
        .and_then(|kv| kv.value.as_deref())
        .map(|v| serde_json::from_str(v).unwrap());
    let df = ParquetReader::new(std::io::Cursor::new(bytes))
        .finish()
        .unwrap();
    (lambda_ctl::serving::format::rows_json(&df), as_of)
}

/// Rows of a CSV file the sink wrote, typed like the API's (the orders data has no commas or
/// quotes in its values).
fn csv_rows(text: &str) -> Vec<Value> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    lines
        .map(|line| {
            let obj: serde_json::Map<String, Value> = header
                .iter()
                .zip(line.split(','))
                .map(|(h, f)| {
                    let v = if f.is_empty() {
                        Value::Null
                    } else if let Ok(x) = f.parse::<f64>() {
                        Value::from(x)
                    } else {
                        Value::String(f.to_string())
                    };
                    (h.to_string(), v)
                })
                .collect();
            Value::Object(obj)
        })
        .collect()
}

async fn files(lake: Option<crate::lakes::TestLake>) {
    let dir_name = format!("exports_{}", unique());
    // On the S3 lake the Parquet file is addressed by a URL into the lake's bucket (the same
    // store: the lake's options apply); the other files are lake-relative.
    let bucket = lake.as_ref().map(|l| {
        l.url
            .trim_start_matches("s3://")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    });
    let parquet = match &bucket {
        Some(b) => format!("s3://{b}/{dir_name}/by_country.parquet"),
        None => format!("{dir_name}/by_country.parquet"),
    };
    let dir = project(&[
        (
            "by_country",
            vec![
                format!("{{type: files, path: \"{parquet}\", every: 50ms}}"),
                format!("{{type: files, path: {dir_name}/by_country, format: csv, every: 50ms}}"),
            ],
        ),
        (
            "overall",
            vec![format!("{{type: files, path: {dir_name}/overall.parquet}}")],
        ),
    ]);
    if let Some(l) = &lake {
        std::fs::write(dir.path().join("lambda.yaml"), l.yaml()).unwrap();
    }
    // Readers: of the lake (relative paths), and of the bucket (the URL one).
    let local_lake = dir.path().join(".lambda/lake");
    let lake_store = lake.as_ref().map(|l| l.open());
    let bucket_store = lake
        .as_ref()
        .zip(bucket.as_ref())
        .map(|(l, b)| lambda_ctl::lake::Lake::open(&format!("s3://{b}"), &l.options).unwrap());
    let in_lake = |path: String| {
        let (store, root) = (lake_store.clone(), local_lake.clone());
        async move {
            match store {
                Some(s) => s.get(&path).await.ok().map(|b| b.to_vec()),
                None => std::fs::read(root.join(&path)).ok(),
            }
        }
    };
    let parquet_file = || {
        let (store, path) = (
            bucket_store.clone(),
            format!("{dir_name}/by_country.parquet"),
        );
        let lake_read = in_lake(path.clone());
        async move {
            match store {
                Some(s) => s.get(&path).await.ok().map(|b| b.to_vec()),
                None => lake_read.await,
            }
        }
    };

    let client = reqwest::Client::new();
    let mut rng = Rng(23);
    let evs = events(&mut rng, 900, 0);
    let mut server = Server::start(dir.path());
    let mut acked = Vec::new();
    let mut runs: Vec<String> = Vec::new();
    for (step, range) in [("ingest", 0..400), ("kill -9", 400..900)] {
        acked.extend(send(&client, &server, &mut rng, &evs[range]).await);
        if step == "kill -9" {
            server.kill9();
            server = Server::start(dir.path());
        }
        wait_for_count(&client, &server, kept(&acked)).await;
        let run = run_batch(dir.path()).await;
        wait_for_batch(&client, &server, &run).await;
        wait_equal(
            &format!("after {step} and a batch run: the Parquet file"),
            &client,
            &server,
            "by_country",
            || async {
                parquet_file()
                    .await
                    .map_or_else(Vec::new, |b| norm_rows(&parquet_rows(b).0))
            },
        )
        .await;
        wait_equal(
            &format!("after {step} and a batch run: the CSV file"),
            &client,
            &server,
            "by_country",
            || async {
                in_lake(format!("{dir_name}/by_country.csv"))
                    .await
                    .map_or_else(Vec::new, |b| {
                        norm_rows(&csv_rows(&String::from_utf8(b).unwrap()))
                    })
            },
        )
        .await;
        wait_equal(
            &format!("after {step} and a batch run: the all-time file"),
            &client,
            &server,
            "overall",
            || async {
                in_lake(format!("{dir_name}/overall.parquet"))
                    .await
                    .map_or_else(Vec::new, |b| norm_rows(&parquet_rows(b).0))
            },
        )
        .await;
        // The file says which answer it holds: one with a published batch view (a file is
        // rewritten only when its rows change, so not necessarily the latest run's).
        let bytes = in_lake(format!("{dir_name}/overall.parquet"))
            .await
            .unwrap();
        let (rows, as_of) = parquet_rows(bytes);
        assert!(rows[0]["window_start"].is_null());
        runs.push(run);
        let file_run = as_of.as_ref().and_then(|a| a["batch_run"].as_str());
        assert!(
            file_run.is_some_and(|r| runs.iter().any(|x| x == r)),
            "{as_of:?}, runs {runs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_the_local_lake_equal_the_views() {
    files(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_s3_equal_the_views() {
    let Some(lake) = crate::lakes::TestLake::s3().await else {
        return;
    };
    files(Some(lake)).await;
}

// ---------------------------------------------------------------------------------------
// Kafka

#[cfg(feature = "kafka")]
mod kafka {
    use std::collections::HashMap;
    use std::time::Duration;

    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    use serde_json::Value;

    /// Best effort: the test topics are unique, a leftover costs nothing but space.
    pub async fn delete_topic(url: &str, topic: &str) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", url)
            .create()
            .unwrap();
        let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
    }

    /// The latest value per key of `topic`, tombstones removing theirs: the rows it holds.
    /// Read to each partition's end as the consumer reports it (tansu's listed watermarks lag).
    pub fn latest(url: &str, topic: &str) -> Vec<Value> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", url)
            .set("group.id", format!("sinks-test-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
            return Vec::new();
        };
        let mut open: Vec<i32> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                open.push(p.id());
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
        let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        if !open.is_empty() {
            consumer.assign(&tpl).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !open.is_empty() && std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    latest.insert(
                        m.key().expect("every record has a key").to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    );
                }
                Some(Err(KafkaError::PartitionEOF(p))) => open.retain(|o| *o != p),
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        latest
            .into_values()
            .flatten()
            .map(|v| super::exact_row(std::str::from_utf8(&v).unwrap()))
            .collect()
    }
}

/// by_country and sessions as changelog topics: after ingest, a batch run and kill -9 while
/// delivering, the latest record per key of each topic equals the view.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_equal_the_views_across_batch_runs_and_kill9() {
    let Some(url) = service("LAMBDA_TEST_KAFKA") else {
        return;
    };
    let tag = unique();
    let topics: Vec<(&str, String)> = ["by_country", "sessions"]
        .iter()
        .map(|v| (*v, format!("sink_{v}_{tag}")))
        .collect();
    let sinks: Vec<(&str, Vec<String>)> = topics
        .iter()
        .map(|(v, t)| {
            (
                *v,
                vec![format!(
                    "{{type: kafka, brokers: \"${{LAMBDA_TEST_KAFKA}}\", topic: {t}, every: 50ms}}"
                )],
            )
        })
        .collect();
    let dir = project(&sinks);
    let client = reqwest::Client::new();
    let mut rng = Rng(31);
    let evs = events(&mut rng, 1200, 0);
    async fn check(
        client: &reqwest::Client,
        server: &Server,
        url: &str,
        topics: &[(&str, String)],
        step: &str,
    ) {
        for (view, topic) in topics {
            wait_equal(
                &format!("{step}: topic {topic}"),
                client,
                server,
                view,
                || {
                    let (url, topic) = (url.to_string(), topic.clone());
                    async move {
                        let rows = tokio::task::spawn_blocking(move || kafka::latest(&url, &topic))
                            .await
                            .unwrap();
                        for r in &rows {
                            assert!(r["as_of"].is_object(), "{r}");
                        }
                        norm_rows(&rows)
                    }
                },
            )
            .await;
        }
    }

    let mut server = Server::start(dir.path());
    let mut acked = send(&client, &server, &mut rng, &evs[..500]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    check(&client, &server, &url, &topics, "after ingest").await;
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;
    check(&client, &server, &url, &topics, "after a batch run").await;
    acked.extend(send(&client, &server, &mut rng, &evs[500..]).await);
    tokio::time::sleep(Duration::from_millis(rng.below(120))).await;
    server.kill9();
    server = Server::start(dir.path());
    wait_for_count(&client, &server, kept(&acked)).await;
    check(&client, &server, &url, &topics, "after kill -9").await;
    server.kill9();
    for (_, topic) in &topics {
        kafka::delete_topic(&url, topic).await;
    }
}

// ---------------------------------------------------------------------------------------
// emit: final

/// `emit: final` on 1-second windows, into a CSV file: a window is written only once its end
/// plus `allowed_lateness` has passed on the wall clock, and a written window is written
/// again when a late event changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_emission_writes_a_window_once_it_has_ended_and_follows_late_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/taps.yaml"),
        "name: taps\nsource: {type: http}\nschema: {id: string, ts: timestamp, k: string}\n\
         event_time: ts\nevent_id: id\nviews:\n  - name: per_second\n    group_by: [k]\n    \
         window: 1s\n    metrics: {n: count()}\n    sinks:\n      - {type: files, path: \
         exports/final.csv, emit: final, allowed_lateness: 1s, every: 50ms}\n",
    )
    .unwrap();
    let file = dir.path().join(".lambda/lake/exports/final.csv");
    // (window_start ms, n) of the rows the file holds.
    let read = || -> Vec<(i64, u64)> {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        csv_rows(&text)
            .iter()
            .map(|r| {
                let start =
                    chrono::DateTime::parse_from_rfc3339(r["window_start"].as_str().unwrap())
                        .unwrap()
                        .timestamp_millis();
                (start, r["n"].as_f64().unwrap() as u64)
            })
            .collect()
    };
    let client = reqwest::Client::new();
    let server = Server::start(dir.path());
    let post = |lines: Vec<String>| {
        let (client, url) = (client.clone(), server.url("/v1/pipelines/taps/events"));
        async move {
            crate::support::post_events(&client, url, orders::NDJSON, lines.join("\n") + "\n").await
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    let old = (now - 10_000).div_euclid(1000) * 1000;
    let future = (now + 6_000).div_euclid(1000) * 1000;
    post(vec![
        format!(r#"{{"id":"a","ts":{},"k":"x"}}"#, old + 100),
        format!(r#"{{"id":"b","ts":{},"k":"x"}}"#, old + 200),
        format!(r#"{{"id":"c","ts":{},"k":"x"}}"#, future + 100),
    ])
    .await;
    crate::support::eventually(
        "the ended window in the file",
        Duration::from_secs(5),
        || async { (read() == vec![(old, 2)]).then_some(()) },
    )
    .await;
    // A late event into a written window: written again, final or not.
    post(vec![format!(r#"{{"id":"d","ts":{},"k":"x"}}"#, old + 300)]).await;
    crate::support::eventually(
        "the late change in the file",
        Duration::from_secs(5),
        || async { (read() == vec![(old, 3)]).then_some(()) },
    )
    .await;
    // The future window appears only once it ended (future + 1 s) and the lateness passed.
    crate::support::eventually(
        "the future window in the file",
        Duration::from_secs(15),
        || async {
            let rows = read();
            if rows.len() < 2 {
                return None;
            }
            let at = chrono::Utc::now().timestamp_millis();
            assert!(
                at >= future + 1_000 + 1_000,
                "written at {at}, before {}",
                future + 2_000
            );
            assert_eq!(rows, vec![(old, 3), (future, 1)]);
            Some(())
        },
    )
    .await;
}
