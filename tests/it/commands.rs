//! The commands and paths a user drives from outside, each checked against an answer the test
//! computes itself: `ingest` (a file, stdin, CSV), `query` (filters, relative times, table,
//! JSON and CSV), the `file` source (a glob, followed across a restart), CSV end to end over
//! HTTP, and `backfill` run to success by a worker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::orchestration::Process;
use crate::orders::{Ev, check_views, events, project, wait_for_count};
use crate::support::{Rng, Server, eventually, get_json, lambda_ctl, post_events, stderr, stdout};

/// `lambda-ctl ARGS` with `input` on its stdin.
fn lambda_ctl_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(args)
        .env_remove("LAMBDA_PROJECT")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the lambda-ctl binary runs");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().expect("write stdin");
    out
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A CSV cell as RFC 4180 writes it: quoted when it holds a comma, quote or line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// ingest

/// `ingest FILE` sends a file of more than one request's worth (4 MiB) and reports the totals
/// and every rejected line by its number in the file, exit 1; `ingest -` reads stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sends_a_file_and_stdin_and_names_every_rejected_line() {
    let dir = project();
    let d = dir.path().to_str().unwrap();
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let mut rng = Rng(11);
    let evs = events(&mut rng, 60_200, 0);
    let (file_evs, stdin_evs) = evs.split_at(60_000);

    // Every event once, a malformed line after every 5,000th, and three redeliveries.
    let mut lines: Vec<String> = Vec::new();
    let mut bad: Vec<usize> = Vec::new();
    for (i, e) in file_evs.iter().enumerate() {
        lines.push(e.line(&mut rng));
        if i % 5_000 == 4_999 {
            lines.push(["{not json", r#"{"id":"x","user":"u1"}"#][i / 5_000 % 2].to_string());
            bad.push(lines.len());
        }
    }
    for e in &file_evs[..3] {
        lines.push(e.line(&mut rng));
    }
    let text = lines.join("\n") + "\n";
    assert!(text.len() > 4 << 20, "the file spans requests");
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, &text).unwrap();
    let f = file.to_str().unwrap();

    let o = lambda_ctl(&[
        "ingest",
        "orders",
        f,
        "--server",
        &server.base,
        "--project",
        d,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "accepted {}, rejected {}, duplicates 3\n",
            file_evs.len(),
            bad.len()
        )
    );
    let err = stderr(&o);
    let named: Vec<usize> = err
        .lines()
        .filter_map(|l| {
            l.strip_prefix(&format!("{f}:"))?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(named, bad, "{err}");
    assert!(
        err.ends_with(&format!(
            "{} line(s) rejected (kept in the dead-letter area with their reasons)\n",
            bad.len()
        )),
        "{err}"
    );
    let kept = |evs: &[Ev]| evs.iter().filter(|e| e.amount >= 0.0).count() as u64;
    wait_for_count(&client, &server, kept(file_evs)).await;
    check_views(&client, &server, file_evs).await;

    let body: String = stdin_evs.iter().map(|e| e.line(&mut rng) + "\n").collect();
    let args = [
        "ingest",
        "orders",
        "-",
        "--server",
        &server.base,
        "--project",
        d,
    ];
    let o = lambda_ctl_stdin(&args, body.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "accepted 200, rejected 0, duplicates 0\n");
    wait_for_count(&client, &server, kept(&evs[..])).await;
    check_views(&client, &server, &evs).await;
}

// ---------------------------------------------------------------------------------------------
// query

/// One order: (id, event time ms, country, amount).
type Order = (&'static str, i64, &'static str, f64);

/// The `orders.by_country` rows (1 m windows per country) of `orders` whose window starts in
/// [from, to) and whose country is `country` (any when None): the oracle of `query`.
fn by_country(orders: &[Order], country: Option<&str>, from: i64, to: i64) -> Vec<Value> {
    let mut windows: BTreeMap<(i64, &str), Vec<f64>> = BTreeMap::new();
    for &(_, ts, c, amount) in orders {
        let start = ts.div_euclid(60_000) * 60_000;
        if amount >= 0.0 && country.is_none_or(|k| k == c) && start >= from && start < to {
            windows.entry((start, c)).or_default().push(amount);
        }
    }
    windows
        .into_iter()
        .map(|((start, c), xs)| {
            let total: f64 = xs.iter().sum();
            json!({
                "window_start": rfc3339(start),
                "window_end": rfc3339(start + 60_000),
                "country": c,
                "n": xs.len(),
                "total": total,
                "lo": xs.iter().copied().fold(f64::INFINITY, f64::min),
                "hi": xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "mean": total / xs.len() as f64,
            })
        })
        .collect()
}

const COLUMNS: [&str; 8] = [
    "window_start",
    "window_end",
    "country",
    "n",
    "total",
    "lo",
    "hi",
    "mean",
];

/// The text of one cell as `query` prints it (amounts here are short binary fractions).
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap()),
        other => other.to_string(),
    }
}

/// `query` of a running server: `--where`, `--from -10m`, `--to -4m`, and each format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_by_key_and_relative_time_in_every_format() {
    let dir = project();
    let d = dir.path().to_str().unwrap();
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp_millis();
    let min = 60_000;
    let orders: Vec<Order> = vec![
        ("a", now - 30 * min, "DE", 10.0),
        ("b", now - 30 * min + 1, "DE", 30.0),
        ("c", now - 30 * min + 2, "FR", 5.5),
        ("d", now - 5 * min, "DE", 2.0),
        ("e", now - 5 * min, "US", 7.0),
        ("f", now - 5 * min, "US", -1.0), // filtered out
        ("g", now - 2 * min, "FR", 1.25),
    ];
    let body: String = orders
        .iter()
        .map(|(id, ts, c, amount)| {
            json!({"id": id, "ts": ts, "user": "u", "country": c, "amount": amount}).to_string()
                + "\n"
        })
        .collect();
    let answer = crate::orders::post(&client, &server, body).await;
    assert_eq!(answer["accepted"], 7, "{answer}");
    wait_for_count(&client, &server, 6).await;

    let query = |args: &[&str]| -> Output {
        let mut all = vec!["query", "orders.by_country", "--server", &server.base];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--project", d]);
        lambda_ctl(&all)
    };
    let json_rows = |o: &Output| -> Vec<Value> {
        assert!(o.status.success(), "{}", stderr(o));
        let v: Value = serde_json::from_str(&stdout(o)).expect("JSON output");
        v["rows"].as_array().expect("rows").clone()
    };
    let all = by_country(&orders, None, i64::MIN, i64::MAX);
    assert_eq!(all.len(), 5);
    assert_eq!(json_rows(&query(&["--format", "json"])), all);
    // The events are minutes away from every bound, so the few seconds between the test's
    // clock and the command's do not matter.
    let ten_ago = now - 10 * min;
    assert_eq!(
        json_rows(&query(&["--from", "-10m", "--format", "json"])),
        by_country(&orders, None, ten_ago, i64::MAX)
    );
    assert_eq!(
        json_rows(&query(&["--to", "-4m", "--format", "json"])),
        by_country(&orders, None, i64::MIN, now - 4 * min)
    );
    let de_recent = by_country(&orders, Some("DE"), ten_ago, i64::MAX);
    assert_eq!(de_recent.len(), 1);
    assert_eq!(
        json_rows(&query(&[
            "--where",
            "country=DE",
            "--from",
            "-10m",
            "--format",
            "json"
        ])),
        de_recent
    );

    // CSV: a header, then one line per row.
    let fr = by_country(&orders, Some("FR"), i64::MIN, i64::MAX);
    let mut csv = COLUMNS.join(",") + "\n";
    for r in &fr {
        let cells: Vec<String> = COLUMNS.iter().map(|c| csv_cell(&cell(&r[*c]))).collect();
        csv.push_str(&(cells.join(",") + "\n"));
    }
    let o = query(&["--where", "country=FR", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), csv);

    // The table (the default): the header, a rule, the rows' cells in order, a summary.
    let o = query(&["--from", "-10m"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    let recent = by_country(&orders, None, ten_ago, i64::MAX);
    assert_eq!(lines.len(), recent.len() + 3, "{text}");
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), COLUMNS);
    assert!(lines[1].chars().all(|c| c == '─' || c == ' '), "{text}");
    for (line, r) in lines[2..].iter().zip(&recent) {
        let cells: Vec<String> = COLUMNS.iter().map(|c| cell(&r[*c])).collect();
        assert_eq!(line.split_whitespace().collect::<Vec<_>>(), cells, "{text}");
    }
    assert!(
        lines[lines.len() - 1].starts_with(&format!("{} rows · batch run none", recent.len())),
        "{text}"
    );

    // A filter on a column the view does not group by is refused, exit 1.
    let o = query(&["--where", "user=u"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("filters apply to its group_by columns (country)"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// the file source

const FILE_PIPELINE: &str = "name: logs
source:
  type: file
  path: data/*.ndjson
  follow: true
schema:
  ts: timestamp
  k: string
  x: int
event_time: ts
archive:
  segment_rows: 40
  segment_age: 1h
views:
  - name: by_k
    group_by: [k]
    window: all
    metrics:
      n: count()
      total: sum(x)
";

/// Appends `n` events numbered from `first` to `path`; returns them as (k, x).
fn append_events(path: &Path, first: u64, n: u64) -> Vec<(String, i64)> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    (first..first + n)
        .map(|i| {
            let (k, x) = (format!("k{}", i % 7), (i * 13 % 101) as i64);
            writeln!(
                f,
                "{}",
                json!({"ts": 1_763_719_200_000 + i as i64, "k": k, "x": x})
            )
            .unwrap();
            (k, x)
        })
        .collect()
}

/// The `logs.by_k` rows of `events`: per key, count and sum, ordered by key.
fn by_k(events: &[(String, i64)]) -> Vec<Value> {
    let mut keys: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for (k, x) in events {
        let e = keys.entry(k).or_default();
        e.0 += 1;
        e.1 += x;
    }
    keys.into_iter()
        .map(|(k, (n, total))| json!({"window_start": null, "window_end": null, "k": k, "n": n, "total": total}))
        .collect()
}

/// Waits until `logs.by_k` answers exactly `expected`.
async fn wait_for_by_k(client: &reqwest::Client, server: &Server, expected: &[Value]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = get_json(client, server.url("/v1/views/logs/by_k")).await["rows"].clone();
        if rows.as_array().is_some_and(|rows| rows == expected) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "logs.by_k answers {rows}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `file` source reads every file its glob matches (and no other), follows them for new
/// lines and new files, and after a crash goes on from its saved offsets: no event is counted
/// twice (the pipeline has no `event_id`: a record read again after a crash between its
/// chunk's log write and the saved offset is dropped by its position).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_source_reads_its_glob_follows_it_and_resumes_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::create_dir_all(root.join("data/sub")).unwrap();
    std::fs::write(root.join("pipelines/logs.yaml"), FILE_PIPELINE).unwrap();
    let data = root.join("data");
    let mut counted = append_events(&data.join("a.ndjson"), 0, 100);
    counted.extend(append_events(&data.join("b.ndjson"), 100, 50));
    // Outside the glob: never read.
    append_events(&data.join("notes.txt"), 1_000, 10);
    append_events(&data.join("sub/c.ndjson"), 2_000, 10);

    let client = reqwest::Client::new();
    let server = Server::start(root);
    wait_for_by_k(&client, &server, &by_k(&counted)).await;

    // New lines in a known file, and a new file.
    counted.extend(append_events(&data.join("a.ndjson"), 150, 20));
    counted.extend(append_events(&data.join("d.ndjson"), 170, 30));
    wait_for_by_k(&client, &server, &by_k(&counted)).await;

    // A crash, then more lines: read from where each file was left, nothing again.
    server.kill9();
    let server = Server::start(root);
    counted.extend(append_events(&data.join("d.ndjson"), 200, 5));
    wait_for_by_k(&client, &server, &by_k(&counted)).await;

    // A truncated file is a new generation: its records count, though their byte offsets
    // were seen before.
    std::fs::write(data.join("b.ndjson"), "").unwrap();
    counted.extend(append_events(&data.join("b.ndjson"), 300, 3));
    wait_for_by_k(&client, &server, &by_k(&counted)).await;
}

// ---------------------------------------------------------------------------------------------
// CSV over HTTP

const CSV_PIPELINE: &str = "name: sales
source:
  type: http
format: csv
schema:
  ts: timestamp
  store: string
  amount: float
  qty: int
event_time: ts
views:
  - name: by_store
    group_by: [store]
    window: 1h
    metrics:
      n: count()
      revenue: sum(amount)
      items: sum(qty)
";

/// A sale: (event time ms, store, amount, qty).
type Sale = (i64, &'static str, f64, i64);

/// The `sales.by_store` CSV of `sales`: 1 h windows per store.
fn by_store_csv(sales: &[Sale]) -> String {
    let mut windows: BTreeMap<(i64, &str), (u64, f64, i64)> = BTreeMap::new();
    for &(ts, store, amount, qty) in sales {
        let w = windows
            .entry((ts.div_euclid(3_600_000) * 3_600_000, store))
            .or_default();
        w.0 += 1;
        w.1 += amount;
        w.2 += qty;
    }
    let mut out = "window_start,window_end,store,n,revenue,items\n".to_string();
    for ((start, store), (n, revenue, items)) in windows {
        out.push_str(&format!(
            "{},{},{},{n},{revenue},{items}\n",
            rfc3339(start),
            rfc3339(start + 3_600_000),
            csv_cell(store)
        ));
    }
    out
}

/// CSV events over HTTP — headers in any column order, a byte order mark, CRLF, quoted fields
/// with commas, quotes and line breaks, a bad record rejected by its line — and the view back
/// as CSV over HTTP and from `query`; `ingest -` sends CSV too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_events_over_http_come_back_as_the_csv_of_their_view() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::write(root.join("pipelines/sales.yaml"), CSV_PIPELINE).unwrap();
    let d = root.to_str().unwrap();
    let server = Server::start(root);
    let client = reqwest::Client::new();
    let h = 3_600_000;
    let t0 = 1_763_719_200_000; // 2025-11-21T10:00:00Z
    let url = server.url("/v1/pipelines/sales/events");
    let post = |body: &str| post_events(&client, url.clone(), "text/csv", body.to_string());

    let a = post("ts,store,amount,qty\n2025-11-21T10:05:00Z,Berlin,10.5,2\n2025-11-21T10:59:59.999Z,Berlin,4.25,1\n2025-11-21T11:00:00Z,Berlin,1,1\n").await;
    assert_eq!(
        (a["accepted"].clone(), a["rejected"].clone()),
        (json!(3), json!(0)),
        "{a}"
    );
    let b = post("\u{feff}qty,store,ts,amount\r\n3,\"Köln, Mitte\",1763719200000,3.25\r\n1,\"Say \"\"hi\"\"\",1763719200001,0.5\r\n").await;
    assert_eq!(
        (b["accepted"].clone(), b["rejected"].clone()),
        (json!(2), json!(0)),
        "{b}"
    );
    let c = post("store,amount,ts,qty\n\"New\nYork\",2,2025-11-21T12:30:00Z,4\nBerlin,lots,2025-11-21T10:10:00Z,1\nBerlin,8,2025-11-21T10:20:00Z,2\n").await;
    assert_eq!(
        (c["accepted"].clone(), c["rejected"].clone()),
        (json!(2), json!(1)),
        "{c}"
    );
    // The bad record is on line 4 of its request (the quoted line break counts).
    assert_eq!(c["errors"][0]["line"], 4, "{c}");

    let mut sales: Vec<Sale> = vec![
        (t0 + 5 * 60_000, "Berlin", 10.5, 2),
        (t0 + h - 1, "Berlin", 4.25, 1),
        (t0 + h, "Berlin", 1.0, 1),
        (t0, "Köln, Mitte", 3.25, 3),
        (t0 + 1, "Say \"hi\"", 0.5, 1),
        (t0 + 2 * h + 30 * 60_000, "New\nYork", 2.0, 4),
        (t0 + 20 * 60_000, "Berlin", 8.0, 2),
    ];
    let csv_of = |client: reqwest::Client, url: String| async move {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    let url = server.url("/v1/views/sales/by_store?format=csv");
    let expected = by_store_csv(&sales);
    eventually("the view holds every sale", Duration::from_secs(20), || {
        let (client, url, expected) = (client.clone(), url.clone(), expected.clone());
        async move { (csv_of(client, url).await == expected).then_some(()) }
    })
    .await;
    let query = [
        "query",
        "sales.by_store",
        "--format",
        "csv",
        "--server",
        &server.base,
    ];
    let o = lambda_ctl(&[&query[..], &["--project", d]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), expected);

    // `ingest -` sends CSV with its header.
    let args = [
        "ingest",
        "sales",
        "-",
        "--server",
        &server.base,
        "--project",
        d,
    ];
    let o = lambda_ctl_stdin(
        &args,
        b"amount,ts,store,qty\n6.75,2025-11-21T10:45:00Z,Berlin,5\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "accepted 1, rejected 0, duplicates 0\n");
    sales.push((t0 + 45 * 60_000, "Berlin", 6.75, 5));
    let expected = by_store_csv(&sales);
    eventually(
        "the view holds the ingested sale",
        Duration::from_secs(20),
        || {
            let (client, url, expected) = (client.clone(), url.clone(), expected.clone());
            async move { (csv_of(client, url).await == expected).then_some(()) }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// backfill

/// `backfill` queues one run per slot in the range; a worker runs them all to success, each
/// task seeing its own slot; a second backfill of the same range queues nothing, and a wider
/// one only the new slots.
#[test]
fn backfill_queues_one_run_per_slot_and_a_worker_runs_them_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("workflows")).unwrap();
    std::fs::write(
        root.join("workflows/hourly.yaml"),
        "name: hourly\nschedule: \"0 * * * *\"\ntimezone: UTC\nmax_active_runs: 2\ntasks:\n  - name: stamp\n    command: [\"sh\", \"-c\", \"echo $LAMBDA_SCHEDULED_AT >> slots.txt\"]\n",
    )
    .unwrap();
    let d = root.to_str().unwrap();
    let backfill = |from: &str, to: &str| {
        lambda_ctl(&[
            "backfill",
            "hourly",
            "--from",
            from,
            "--to",
            to,
            "--project",
            d,
        ])
    };
    let slot = |h: u32| format!("2026-01-01T{h:02}:00:00Z");

    let o = backfill("2026-01-01T00:00:00Z", "2026-01-01T05:00:00Z");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "queued 6 runs of hourly (1..=6); `lambda-ctl serve` or `lambda-ctl worker` runs them\n"
    );
    let mut worker = Process::start(root, &["worker"]);
    worker.wait_for("worker started", Duration::from_secs(60));
    let runs = || stdout(&lambda_ctl(&["runs", "hourly", "--project", d]));
    let succeeded = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let table = runs();
            if table.lines().filter(|l| l.contains(" succeeded ")).count() == n {
                return table;
            }
            assert!(std::time::Instant::now() < deadline, "{table}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let table = succeeded(6);
    // Newest first: run 6 has the last slot.
    for (row, h) in table.lines().skip(1).zip((0..6).rev()) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[..4],
            [
                (h + 1).to_string().as_str(),
                "hourly",
                "succeeded",
                slot(h).as_str()
            ],
            "{table}"
        );
    }
    let mut stamped: Vec<String> = std::fs::read_to_string(root.join("slots.txt"))
        .unwrap()
        .lines()
        .map(|l| chrono::DateTime::parse_from_rfc3339(l).unwrap().to_utc())
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .collect();
    stamped.sort();
    assert_eq!(stamped, (0..6).map(slot).collect::<Vec<_>>());

    let o = backfill("2026-01-01T00:00:00Z", "2026-01-01T05:00:00Z");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "every slot of hourly in the range already has a run (or none falls in it); nothing queued\n"
    );
    let o = backfill("2026-01-01T03:00:00Z", "2026-01-01T07:00:00Z");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "queued 2 runs of hourly (7..=8); `lambda-ctl serve` or `lambda-ctl worker` runs them\n"
    );
    succeeded(8);
    worker.kill9();
}
