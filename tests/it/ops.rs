//! Operating a server, through the real binary: `/metrics` counts exactly what was sent and
//! parses as Prometheus text; bearer-token auth and the body limit refuse what they must while
//! the server keeps serving; `status` with and without a server; the dashboard in headless
//! Chromium (`LAMBDA_TEST_CHROMIUM`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::orders::{BASE_MS, NDJSON, post, project};
use crate::support::{Server, get_json, lambda_ctl, stderr, stdout};

/// A workflow whose only task fails once, is retried, and fails again.
const FAILING_WORKFLOW: &str = r#"
name: flaky
schedule: "0 3 * * *"
timezone: Europe/Berlin
tasks:
  - name: check
    command: ["false"]
    retries: 1
    retry_delay: 1s
"#;

/// One parsed sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format strictly: every sample's family is declared by `# HELP`
/// and `# TYPE` before it, families are contiguous, names and label values are well formed.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut finished: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP has a text");
            assert!(valid_name(name), "bad metric name {name}");
            assert!(!helped.contains(&name.to_string()), "HELP twice for {name}");
            helped.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert_eq!(
                helped.last().map(String::as_str),
                Some(name),
                "HELP before TYPE: {line}"
            );
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "TYPE twice: {line}"
            );
            if let Some(prev) = current.replace(name.to_string()) {
                finished.push(prev);
            }
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("sample without value: {line}"),
        };
        let family = current.clone().expect("a sample before any TYPE");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert_eq!(base, family, "sample {name} outside its family's block");
        assert!(
            !finished.contains(&family),
            "family {family} is not contiguous"
        );
        if name.ends_with("_total") {
            assert_eq!(types[base], "counter", "{name}: _total names a counter");
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end;
            loop {
                let start = chars.peek().expect("label").0;
                let mut key_end = start;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                }
                let key = &r[start..key_end];
                assert!(
                    valid_name(key) && !key.contains(':'),
                    "bad label name {key} in {line}"
                );
                assert_eq!(
                    chars.next().map(|c| c.1),
                    Some('"'),
                    "label value quoted: {line}"
                );
                let mut value = String::new();
                loop {
                    match chars.next().expect("closed label value").1 {
                        '\\' => match chars.next().expect("escape").1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("bad escape \\{other} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline in a label value"),
                        c => value.push(c),
                    }
                }
                labels.insert(key.to_string(), value);
                match chars.next().expect("label separator") {
                    (_, ',') => continue,
                    (i, '}') => {
                        end = i;
                        break;
                    }
                    (_, c) => panic!("unexpected {c} in {line}"),
                }
            }
            rest = &r[end + 1..];
        }
        let value = rest.strip_prefix(' ').expect("space before value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        samples.push((name.to_string(), labels, value));
    }
    samples
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

async fn scrape(client: &reqwest::Client, server: &Server) -> Vec<Sample> {
    let r = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse_exposition(&r.text().await.unwrap())
}

fn event(id: usize, amount: f64) -> String {
    serde_json::json!({"id": format!("m{id}"), "ts": BASE_MS + id as i64 * 1000, "user": format!("u{}", id % 7), "country": (["DE", "US"][id % 2]), "amount": amount}).to_string()
}

fn with_workflow(dir: &Path) {
    std::fs::create_dir_all(dir.join("workflows")).unwrap();
    std::fs::write(dir.join("workflows/flaky.yaml"), FAILING_WORKFLOW).unwrap();
    // The run executes in this process; it fails after one retry.
    let o = lambda_ctl(&["run", "flaky", "--wait", "--project", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_sent() {
    let dir = project();
    with_workflow(dir.path());
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();

    // 3 requests: 40 good events (5 of them filtered out by `amount >= 0`, still accepted),
    // 6 malformed lines and 3 without a usable `event_id`, then 10 redelivered ids.
    let good: Vec<String> = (0..40)
        .map(|i| event(i, if i % 8 == 0 { -1.0 } else { i as f64 }))
        .collect();
    let mut first = good[..25].to_vec();
    first.extend([
        "{not json".to_string(),
        r#"{"id":"x","ts":"yesterday-ish","user":"u","country":"DE","amount":1}"#.to_string(),
    ]);
    let a = post(&client, &server, first.join("\n")).await;
    assert_eq!(
        (a["accepted"].as_u64(), a["rejected"].as_u64()),
        (Some(25), Some(2))
    );
    let mut second = good[25..].to_vec();
    second.extend(
        [
            "42",
            "[]",
            "{\"id\":",
            r#"{"id":"y","ts":1,"user":"u","country":"DE","amount":"lots"}"#,
            // No usable id: neither accepted unchecked nor taken for a duplicate.
            r#"{"ts":1,"user":"u","country":"DE","amount":1}"#,
            r#"{"id":"","ts":1,"user":"u","country":"DE","amount":1}"#,
            r#"{"id":"","ts":2,"user":"u","country":"DE","amount":1}"#,
        ]
        .map(String::from),
    );
    let a = post(&client, &server, second.join("\n")).await;
    assert_eq!(
        (a["accepted"].as_u64(), a["rejected"].as_u64()),
        (Some(15), Some(7)),
        "{a}"
    );
    let reasons: Vec<&str> = a["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| r.starts_with("missing event_id"))
        .collect();
    assert_eq!(
        reasons,
        [
            "missing event_id `id`",
            "missing event_id: `id` is empty",
            "missing event_id: `id` is empty"
        ]
    );
    let a = post(&client, &server, good[..10].join("\n")).await;
    assert_eq!(a["duplicates"].as_u64(), Some(10));

    // Every acknowledged request becomes visible: two observations of ack→visible.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let s = scrape(&client, &server).await;
        let seen = value(
            &s,
            "lambda_ack_to_visible_seconds_count",
            &[("pipeline", "orders")],
        );
        if seen == Some(2.0) || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let p = [("pipeline", "orders")];
    for (name, sent) in [
        ("lambda_events_accepted_total", 40.0),
        ("lambda_events_rejected_total", 9.0),
        ("lambda_events_deduplicated_total", 10.0),
        // Accepted, archived, but in no view: `filter: amount >= 0` (SPEC: "counted").
        ("lambda_filtered_events_total", 5.0),
        ("lambda_ack_to_visible_seconds_count", 2.0),
    ] {
        assert_eq!(value(&samples, name, &p), Some(sent), "{name}");
    }
    assert_eq!(
        value(
            &samples,
            "lambda_ack_to_visible_seconds_bucket",
            &[("pipeline", "orders"), ("le", "+Inf")]
        ),
        Some(2.0)
    );
    // Histogram buckets are cumulative.
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "lambda_ack_to_visible_seconds_bucket" && l["pipeline"] == "orders"
        })
        .map(|s| s.2)
        .collect();
    assert!(
        buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );
    for name in [
        "lambda_ingest_rate_events_per_second",
        "lambda_open_segment_rows",
        "lambda_open_segment_age_seconds",
        "lambda_sealed_segments",
        "lambda_speed_state_groups",
        "lambda_speed_state_bytes",
    ] {
        assert!(value(&samples, name, &p).is_some(), "{name} missing");
    }
    assert!(value(&samples, "lambda_speed_state_groups", &p).unwrap() > 0.0);
    // The one partition: everything durable is absorbed by now.
    let p0 = [("pipeline", "orders"), ("partition", "0")];
    assert_eq!(
        value(&samples, "lambda_partition_unabsorbed_events", &p0),
        Some(0.0)
    );
    assert!(value(&samples, "lambda_partition_open_segment_rows", &p0).is_some());
    assert!(value(&samples, "lambda_uptime_seconds", &[]).unwrap() > 0.0);
    assert_eq!(
        value(
            &samples,
            "lambda_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );

    // Workflows, from the state DB: one failed run, two attempts (one retry), both timed.
    let w = [("workflow", "flaky")];
    assert_eq!(
        value(
            &samples,
            "lambda_workflow_runs",
            &[("workflow", "flaky"), ("state", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "lambda_workflow_runs",
            &[("workflow", "flaky"), ("state", "succeeded")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "lambda_workflow_task_retries_total", &w),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "lambda_workflow_task_duration_seconds_count", &w),
        Some(2.0)
    );
    let next = value(&samples, "lambda_workflow_next_fire_timestamp_seconds", &w).unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        next > now && next <= now + 86_400.0,
        "next fire {next} within a day"
    );

    // Serving answers are counted per layer; no batch view yet, so all rows are speed rows.
    let r: Value = get_json(&client, server.url("/v1/views/orders/by_country?origin=1")).await;
    let rows = r["rows"].as_array().unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|row| row["_origin"] == "speed"),
        "{r}"
    );
    let speed_rows = r["as_of"]["speed_rows"].as_f64().unwrap();
    let samples = scrape(&client, &server).await;
    let v = [("pipeline", "orders"), ("view", "by_country")];
    assert_eq!(value(&samples, "lambda_view_queries_total", &v), Some(1.0));
    let layer = |l| [("pipeline", "orders"), ("view", "by_country"), ("layer", l)];
    assert_eq!(
        value(&samples, "lambda_view_rows_served_total", &layer("speed")),
        Some(speed_rows)
    );
    assert_eq!(
        value(&samples, "lambda_view_rows_served_total", &layer("batch")),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "lambda_view_batch_cutoff_age_seconds", &v),
        None
    );

    // After a batch run the view has a cutoff age, and its rows are batch rows.
    let o = lambda_ctl(&[
        "run",
        "orders",
        "--wait",
        "--project",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(&client, &server).await;
        if let Some(age) = value(&s, "lambda_view_batch_cutoff_age_seconds", &v) {
            assert!((0.0..60.0).contains(&age), "{age}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no batch cutoff age after a batch run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn exposition_parser_rejects_malformed_text() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{p=\"q\\\"r\"} 1\n";
    assert_eq!(parse_exposition(ok)[0].1["p"], "q\"r");
    for bad in [
        "a_total 1\n",                                                   // undeclared
        "# HELP a x\n# TYPE a gauge\na{p=\"x\\q\"} 1\n",                 // bad escape
        "# HELP a x\n# TYPE a gauge\na{p=x} 1\n",                        // unquoted
        "# HELP a x\n# TYPE a gauge\n# HELP b y\n# TYPE b gauge\na 1\n", // not contiguous
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_exposition(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no Content-Length up front); the status.
fn chunked_post(server: &Server, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = server.base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer s3cret-token\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for chunk in body.as_bytes().chunks(512) {
        req.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            String::from_utf8_lossy(chunk)
        ));
    }
    req.push_str("0\r\n\r\n");
    // The server may answer and close before reading everything.
    let _ = s.write_all(req.as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

fn write_settings(dir: &Path, serve: &str) {
    std::fs::write(dir.join("lambda.yaml"), format!("serve:\n{serve}")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_body_limit_refuse_and_the_server_keeps_serving() {
    let dir = project();
    write_settings(
        dir.path(),
        "  token: s3cret-token\n  max_body_bytes: 2048\n",
    );
    let log = dir.path().join("serve.log");
    let server = Server::start_logging(dir.path(), &log);
    let client = reqwest::Client::new();
    let events = server.url("/v1/pipelines/orders/events");
    let body = (0..5).map(|i| event(i, 1.0)).collect::<Vec<_>>().join("\n");

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-tokenX"),
        Some("s3cret-token"),
    ] {
        let mut req = client
            .post(&events)
            .header("content-type", NDJSON)
            .body(body.clone());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains("bearer token"), "{e}");
    }
    for path in [
        "/v1/pipelines",
        "/v1/views/orders/by_country",
        "/v1/views/nope/x",
    ] {
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }

    // Over the limit: 413 with a message naming the setting, with or without Content-Length.
    let big = (0..200)
        .map(|i| event(i, 1.0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(big.len() > 2048);
    let r = client
        .post(&events)
        .bearer_auth("s3cret-token")
        .header("content-type", NDJSON)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("serve.max_body_bytes"),
        "{e}"
    );
    assert_eq!(
        chunked_post(&server, "/v1/pipelines/orders/events", &big),
        413
    );

    // Meanwhile the server serves valid requests; health and metrics stay open.
    let r = client
        .post(&events)
        .bearer_auth("s3cret-token")
        .header("content-type", NDJSON)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["accepted"], 5);
    assert_eq!(
        client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let samples = scrape(&client, &server).await;
    assert_eq!(
        value(
            &samples,
            "lambda_events_accepted_total",
            &[("pipeline", "orders")]
        ),
        Some(5.0)
    );
    assert_eq!(
        client.get(server.url("/")).send().await.unwrap().status(),
        200
    );
    drop(server);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("request refused"),
        "refusals are logged: {logs}"
    );
    assert!(
        !logs.contains("s3cret-token"),
        "the token leaked into the logs"
    );

    // `status` never prints the token either.
    let o = lambda_ctl(&[
        "status",
        "--json",
        "--server",
        "127.0.0.1:1",
        "--project",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("s3cret-token") && !stderr(&o).contains("s3cret-token"));

    // protect_metrics: /metrics needs the token too.
    write_settings(
        dir.path(),
        "  token: s3cret-token\n  protect_metrics: true\n",
    );
    let server = Server::start(dir.path());
    let r = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(server.url("/metrics"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn protect_metrics_without_a_token_is_a_spec_error() {
    let dir = project();
    write_settings(dir.path(), "  protect_metrics: true\n");
    let o = lambda_ctl(&["validate", "--project", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o) + &stderr(&o);
    assert!(
        out.contains("lambda.yaml:2:20: `protect_metrics: true` needs a `token`"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_state_db_and_adds_live_figures_from_a_server() {
    let dir = project();
    with_workflow(dir.path());
    let d = dir.path().to_str().unwrap();

    // No server: figures from the state DB, the failing workflow first and marked.
    let o = lambda_ctl(&["status", "--server", "127.0.0.1:1", "--project", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("no server at http://127.0.0.1:1 "), "{text}");
    let flaky = text
        .lines()
        .find(|l| l.contains("flaky") && l.contains("0 3 * * *"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        flaky.starts_with('!') && flaky.contains("(Europe/Berlin)") && flaky.contains(" failed"),
        "{flaky}"
    );
    assert!(text.contains("RECENT RUNS\nID"), "{text}");
    let o = lambda_ctl(&[
        "status",
        "--json",
        "--server",
        "127.0.0.1:1",
        "--project",
        d,
    ]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["server"]["reachable"], false);
    let w = &s["workflows"][0];
    assert_eq!(
        (w["name"].as_str(), w["failing"].as_bool()),
        (Some("flaky"), Some(true))
    );
    assert_eq!(w["last_run"]["state"], "failed");
    assert_eq!(w["runs"]["failed"], 1);
    let next: chrono::DateTime<chrono::Utc> = w["next_fire"].as_str().unwrap().parse().unwrap();
    assert!(next > chrono::Utc::now());
    assert_eq!(s["pipelines"][0]["name"], "orders");
    assert!(s["pipelines"][0]["live"].is_null());
    assert_eq!(s["recent_runs"][0]["state"], "failed");

    // With the server: live counters; 3 of the 12 events fail `amount >= 0`.
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    post(
        &client,
        &server,
        (0..12)
            .map(|i| event(i, if i % 4 == 0 { -2.0 } else { 2.0 }))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .await;
    // Filtered events are counted once the speed layer has taken them (right after the ack).
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let o = lambda_ctl(&["status", "--json", "--server", &server.base, "--project", d]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s: Value = serde_json::from_slice(&o.stdout).unwrap();
        if s["pipelines"][0]["live"]["filtered"] == 3 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s["server"]["reachable"], true);
    let live = &s["pipelines"][0]["live"];
    assert_eq!(live["accepted"], 12);
    assert_eq!(live["filtered"], 3, "{live}");
    assert!(
        live["ingest_rate"].is_number() && live["open_segment_rows"].is_number(),
        "{live}"
    );
    let o = lambda_ctl(&["status", "--server", &server.base, "--project", d]);
    let text = stdout(&o);
    assert!(
        text.contains(&format!("live from {}", server.base)),
        "{text}"
    );
    let orders = text
        .lines()
        .find(|l| l.contains("orders") && l.contains("http"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(orders.contains(" rows, "), "open segment shown: {orders}");
    let header = text
        .lines()
        .find(|l| l.contains("REJECTED"))
        .unwrap_or_else(|| panic!("{text}"));
    let at = header.find("FILTERED").expect("a FILTERED column");
    assert_eq!(
        orders.get(at..).and_then(|r| r.split_whitespace().next()),
        Some("3"),
        "{header}\n{orders}"
    );
}

/// Runs headless Chromium on `url` and returns the DOM after `budget_ms` of virtual time.
pub fn dump_dom(chromium: &str, url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("LAMBDA_TEST_CHROMIUM={chromium} does not run: {e}"));
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn attr<'a>(dom: &'a str, element_id: &str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{element_id}\""))?;
    let tag = &dom[dom[..at].rfind('<')?..];
    let tag = &tag[..tag.find('>')?];
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    Some(&tag[start..start + tag[start..].find('"')?])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_pipeline_and_its_chart_follows_new_events() {
    let Some(chromium) = crate::support::service("LAMBDA_TEST_CHROMIUM") else {
        return;
    };
    assert!(
        Path::new(&chromium).exists(),
        "LAMBDA_TEST_CHROMIUM={chromium} does not exist"
    );
    // The orders-http example, with a token the page receives in its URL fragment.
    let dir = tempfile::tempdir().unwrap();
    let example = crate::support::repo().join("examples/orders-http");
    for sub in ["pipelines", "workflows"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for f in std::fs::read_dir(example.join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    write_settings(dir.path(), "  token: dash-token\n");
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let send = |from: usize, n: usize| {
        let body: Vec<String> = (from..from + n)
            .map(|i| serde_json::json!({"order_id": format!("o{i}"), "ts": BASE_MS + (i as i64 % 3) * 3_600_000, "customer": format!("c{}", i % 9), "country": (["DE", "FR", "US"][i % 3]), "amount": 10.0 + i as f64, "items": 1}).to_string())
            .collect();
        client
            .post(server.url("/v1/pipelines/orders/events"))
            .bearer_auth("dash-token")
            .header("content-type", NDJSON)
            .body(body.join("\n"))
            .send()
    };
    assert_eq!(send(0, 30).await.unwrap().status(), 200);

    let url = server.url("/#token=dash-token&view=orders.revenue&metric=orders");
    let dom = dump_dom(&chromium, &url, &["--dump-dom"]);
    assert!(
        dom.contains("data-pipeline=\"orders\""),
        "the pipeline is listed: {dom}"
    );
    assert_eq!(
        attr(&dom, "chart", "data-view"),
        Some("orders.revenue"),
        "{dom}"
    );
    assert_eq!(attr(&dom, "chart", "data-total"), Some("30"), "{dom}");
    assert!(
        dom.contains("data-origin=\"speed\""),
        "bars tagged with their layer: {dom}"
    );
    assert!(
        dom.contains("data-workflow=\"hourly\""),
        "the workflow is listed: {dom}"
    );

    assert_eq!(send(30, 12).await.unwrap().status(), 200);
    let dom = dump_dom(&chromium, &url, &["--dump-dom"]);
    assert_eq!(
        attr(&dom, "chart", "data-total"),
        Some("42"),
        "the chart follows: {dom}"
    );

    // A screenshot of the page, as a person sees it.
    let shot = dir.path().join("dashboard.png");
    dump_dom(
        &chromium,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(to) = std::env::var_os("LAMBDA_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, to).unwrap();
    }
}
