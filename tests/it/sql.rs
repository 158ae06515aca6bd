//! SQL over the PostgreSQL wire protocol (`serve.sql`), driven by real clients: psql (simple
//! query, its `\dt` and `\d`), and sqlx (extended query: prepared statements, binds, binary
//! results). Every view read over SQL is the HTTP API's answer, row for row.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, Row};

use crate::lambda::kept;
use crate::orders::{events, get_view, project, send, wait_for_count};
use crate::support::{Rng, Server, service};

const VIEWS: [&str; 4] = ["by_country", "hop", "sessions", "overall"];

/// `serve` with `lambda.yaml` as given; returns the server and its `postgres://` address.
fn start(project: &Path, lambda_yaml: &str) -> (Server, String) {
    use std::io::BufRead;
    std::fs::write(project.join("lambda.yaml"), lambda_yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lambda-ctl"))
        .args(["serve", "--listen", "127.0.0.1:0", "--project"])
        .arg(project)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start lambda-ctl serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut sql = None;
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("lambda-ctl SQL on ") {
                    sql = Some(url.trim().to_string());
                }
                if let Some(url) = line.strip_prefix("lambda-ctl serving on ") {
                    break url.trim().to_string();
                }
            }
            _ => panic!(
                "lambda-ctl serve exited before listening: {:?}",
                child.wait()
            ),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let sql = sql.expect("the SQL address is printed before the HTTP one");
    (Server { child, base }, sql)
}

const SQL_ONLY: &str = "serve:\n  sql: {listen: 127.0.0.1:0}\n";

/// psql with `args`, unaligned, NULL printed as `\N`, failing on the first error.
fn psql(url: &str, password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(format!("{url}/lambda?user=grafana"))
        .args([
            "-X",
            "-q",
            "-A",
            "-F",
            "\u{1f}",
            "-P",
            "null=\\N",
            "-P",
            "footer=off",
        ])
        .args(["-w", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.output()
        .expect("psql runs (it is installed on the machines)")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "psql failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// psql's unaligned output (header line first) as rows of column → cell.
fn table(out: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\u{1f}').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('\u{1f}'))
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()
        })
        .collect()
}

/// A psql cell in the form of the HTTP API's JSON value `like`: same number, same instant,
/// same text, both null.
fn same(cell: &str, like: &Value) -> bool {
    match like {
        Value::Null => cell == "\\N",
        Value::Number(n) if n.is_i64() || n.is_u64() => cell.parse::<i64>().ok() == n.as_i64(),
        // Parsed as the JSON number was: serde_json's float parsing is not always correctly
        // rounded, so the same text must go through the same parser to give the same f64.
        Value::Number(n) => serde_json::from_str::<f64>(cell).ok() == n.as_f64(),
        Value::Bool(b) => cell == if *b { "t" } else { "f" },
        Value::String(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => pg_time(cell) == Some(t.timestamp_micros()),
            Err(_) => cell == s,
        },
        other => serde_json::to_string(other).is_ok_and(|text| text == cell),
    }
}

/// PostgreSQL's `timestamptz` text (`2025-11-21 10:00:00.5+00`) as epoch microseconds.
fn pg_time(cell: &str) -> Option<i64> {
    let t = cell.strip_suffix("+00")?;
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros())
}

/// Whether psql's rows are exactly the HTTP API's, in any order.
fn matches(sql: &[BTreeMap<String, String>], http: &[Value]) -> Result<(), String> {
    if sql.len() != http.len() {
        return Err(format!(
            "{} rows over SQL, {} over HTTP",
            sql.len(),
            http.len()
        ));
    }
    let mut unmatched: Vec<&BTreeMap<String, String>> = sql.iter().collect();
    for row in http {
        let obj = row.as_object().unwrap();
        let found = unmatched.iter().position(|s| {
            s.len() == obj.len()
                && obj
                    .iter()
                    .all(|(k, v)| s.get(k).is_some_and(|cell| same(cell, v)))
        });
        match found {
            Some(i) => {
                unmatched.swap_remove(i);
            }
            None => {
                let near: Vec<_> = unmatched
                    .iter()
                    .filter(|s| {
                        obj.iter()
                            .filter(|(_, v)| v.is_string())
                            .all(|(k, v)| s.get(k).is_some_and(|cell| same(cell, v)))
                    })
                    .collect();
                return Err(format!(
                    "HTTP row {row} not among the SQL rows; the SQL rows with its keys: {near:?}"
                ));
            }
        }
    }
    Ok(())
}

/// A project with the orders pipeline and its events sent and visible; `token` is
/// `serve.token` when `lambda_yaml` sets one (the HTTP client sends it).
async fn loaded(
    lambda_yaml: &str,
    token: Option<&str>,
) -> (tempfile::TempDir, Server, String, reqwest::Client) {
    let dir = project();
    let (server, sql) = start(dir.path(), lambda_yaml);
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let bearer = format!("Bearer {token}").parse().unwrap();
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let mut rng = Rng(20);
    let evs = events(&mut rng, 600, 0);
    let acked = send(&client, &server, &mut rng, &evs).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    (dir, server, sql, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_reads_every_view_exactly_as_the_http_api_and_browses_them() {
    let (_dir, server, sql, client) = loaded(SQL_ONLY, None).await;
    for view in VIEWS {
        // The answer may be recomputed between two reads (segments sealing): compare one
        // SQL read with an HTTP answer that did not change around it.
        let mut last = String::new();
        let mut agreed = false;
        for _ in 0..20 {
            let before = get_view(&client, &server, view).await["rows"].clone();
            let out = ok(&psql(
                &sql,
                None,
                &["-c", &format!("SELECT * FROM orders.{view}")],
            ));
            let after = get_view(&client, &server, view).await["rows"].clone();
            if before != after {
                continue;
            }
            let rows = before.as_array().unwrap();
            assert!(!rows.is_empty(), "{view} has rows");
            match matches(&table(&out), rows) {
                Ok(()) => {
                    agreed = true;
                    break;
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(agreed, "view {view}: {last}");
    }

    let listed = ok(&psql(&sql, None, &["-c", "\\dt orders.*"]));
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.split('\u{1f}').collect::<Vec<_>>())
        .filter(|f| f.len() == 4 && f[0] == "orders" && f[2] == "table")
        .map(|f| f[1])
        .collect();
    let mut expected = VIEWS.to_vec();
    expected.sort();
    assert_eq!(names, expected, "{listed}");

    let described = ok(&psql(&sql, None, &["-c", "\\d orders.by_country"]));
    for line in [
        "window_start\u{1f}timestamp with time zone",
        "window_end\u{1f}timestamp with time zone",
        "country\u{1f}text",
        "n\u{1f}bigint",
        "total\u{1f}double precision",
    ] {
        assert!(
            described.contains(line),
            "`\\d` lacks {line:?}:\n{described}"
        );
    }

    // Grafana: `$__timeFilter` expanded, a time bucket, GROUP BY 1 ORDER BY 1.
    let http = get_view(&client, &server, "by_country").await["rows"].clone();
    let mut per_minute: BTreeMap<i64, i64> = BTreeMap::new();
    for r in http.as_array().unwrap() {
        let t = crate::orders::ms(&r["window_start"]).unwrap();
        if (crate::orders::BASE_MS..crate::orders::BASE_MS + 3_600_000).contains(&t) {
            *per_minute.entry(t / 1000).or_default() += r["n"].as_i64().unwrap();
        }
    }
    let grafana = "SELECT floor(extract(epoch from window_start)/60)*60 AS \"time\", sum(n) AS n \
                   FROM orders.by_country \
                   WHERE window_start BETWEEN '2025-11-21T10:00:00Z' AND '2025-11-21T10:59:59.999Z' \
                   GROUP BY 1 ORDER BY 1";
    let out = ok(&psql(&sql, None, &["-c", grafana]));
    let got: Vec<(i64, i64)> = table(&out)
        .iter()
        .map(|r| {
            (
                r["time"].parse::<f64>().unwrap() as i64,
                r["n"].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, per_minute.into_iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlx_prepares_binds_and_reads_typed_values() {
    let (_dir, server, sql, client) = loaded(SQL_ONLY, None).await;
    let mut conn = sqlx::PgConnection::connect(&format!("{sql}/lambda?user=bi"))
        .await
        .expect("sqlx connects");

    // A prepared statement run with two binds each time (sqlx caches it).
    let from = chrono::DateTime::from_timestamp_millis(crate::orders::BASE_MS).unwrap();
    for country in ["DE", "US"] {
        let rows = sqlx::query(
            "SELECT window_start, country, n, total FROM orders.by_country \
             WHERE country = $1 AND window_start >= $2 ORDER BY window_start",
        )
        .bind(country)
        .bind(from)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let url = server.url(&format!(
            "/v1/views/orders/by_country?country={country}&from={}",
            crate::orders::BASE_MS
        ));
        let http: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        let mut expected: Vec<(i64, i64)> = http["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    crate::orders::ms(&r["window_start"]).unwrap(),
                    r["n"].as_i64().unwrap(),
                )
            })
            .collect();
        expected.sort();
        assert!(!expected.is_empty());
        let got: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| {
                let t: chrono::DateTime<chrono::Utc> = r.get("window_start");
                assert_eq!(r.get::<String, _>("country"), country);
                let _: f64 = r.get("total");
                (t.timestamp_millis(), r.get::<i64, _>("n"))
            })
            .collect();
        assert_eq!(got, expected, "{country}");
    }

    // Point queries the row index answers alone (projection + key and window filters) give
    // what polars SQL gives for the same statement made opaque to the index (`AND true`).
    let until =
        chrono::DateTime::from_timestamp_millis(crate::orders::BASE_MS + 1_800_000).unwrap();
    for (statement, binds) in [
        ("SELECT * FROM orders.by_country WHERE country = $1", 1),
        (
            "SELECT country, n AS orders, window_start FROM orders.by_country \
             WHERE (country = $1) AND window_start >= $2 AND window_start < $3",
            3,
        ),
        ("SELECT n, users FROM orders.overall", 0),
        (
            "SELECT * FROM orders.by_country WHERE country = 'nowhere'",
            0,
        ),
    ] {
        let run = |sql: String| {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for i in 0..binds {
                q = match i {
                    0 => q.bind("US"),
                    1 => q.bind(from),
                    _ => q.bind(until),
                };
            }
            q
        };
        let fast = run(statement.to_string())
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let opaque = if statement.contains("WHERE") {
            format!("{statement} AND true")
        } else {
            format!("{statement} WHERE true")
        };
        let slow = run(opaque).fetch_all(&mut conn).await.unwrap();
        let text = |rows: &[sqlx::postgres::PgRow]| -> Vec<String> {
            use sqlx::Column;
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            let c = &r.columns()[i];
                            let v = r.try_get_raw(i).unwrap();
                            format!("{}={:?}", c.name(), v.as_bytes().ok())
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect()
        };
        assert_eq!(text(&fast), text(&slow), "{statement}");
        if !statement.contains("nowhere") {
            assert!(!fast.is_empty(), "{statement} finds rows");
        }
    }

    // Time arithmetic and truncation.
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders.by_country WHERE window_start > now() - interval '100000 hours'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let all = get_view(&client, &server, "by_country").await["rows"]
        .as_array()
        .unwrap()
        .len() as i64;
    assert_eq!(n, all);
    let hours: Vec<(chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', window_start) AS hour, sum(n) AS n FROM orders.by_country GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(hours.iter().all(|(h, _)| h.timestamp() % 3600 == 0));

    // An error answers its SQLSTATE and position; the connection stays usable.
    let e = sqlx::query("SELECT nope FROM orders.by_country")
        .fetch_all(&mut conn)
        .await
        .unwrap_err();
    let db = e.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("42703"), "{db}");
    let e = sqlx::query("INSERT INTO orders.by_country (n) VALUES (1)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let db = e.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("25006"), "{db}");
    assert!(db.message().contains("read-only"), "{db}");
    let one: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.overall")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);

    // What clients ask when they connect and browse.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'orders' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, ["by_country", "hop", "overall", "sessions"]);
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name, data_type FROM information_schema.columns \
         WHERE table_schema = 'orders' AND table_name = 'overall' ORDER BY ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        columns[0],
        ("window_start".into(), "timestamp with time zone".into())
    );
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(version.starts_with("PostgreSQL 16"), "{version}");
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(schema, "public");
    sqlx::query("SET application_name = 'grafana'")
        .execute(&mut conn)
        .await
        .unwrap();
    let tz: String = sqlx::query_scalar("SHOW TimeZone")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tz, "UTC");
    let typname: String =
        sqlx::query_scalar("SELECT typname FROM pg_catalog.pg_type WHERE oid = 1184")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(typname, "timestamptz");
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_the_password_and_limits_hold() {
    let yaml = "serve:\n  token: s3cret-token\n  sql: {listen: 127.0.0.1:0, max_rows: 3}\n";
    let (_dir, _server, sql, _client) = loaded(yaml, Some("s3cret-token")).await;
    // No password, or a wrong one: refused (SCRAM-SHA-256), and the token never echoed.
    let refused = psql(&sql, Some("wrong"), &["-c", "SELECT 1"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.to_lowercase()
            .contains("password authentication failed"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    let e = sqlx::PgConnection::connect(&format!("{sql}/lambda?user=bi&password=nope"))
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("28P01"),
        "{e}"
    );
    // The token: in, and the row limit answers 54000 while a small answer passes.
    let out = ok(&psql(
        &sql,
        Some("s3cret-token"),
        &["-c", "SELECT n FROM orders.overall"],
    ));
    assert_eq!(table(&out).len(), 1);
    let mut conn =
        sqlx::PgConnection::connect(&format!("{sql}/lambda?user=bi&password=s3cret-token"))
            .await
            .unwrap();
    let e = sqlx::query("SELECT * FROM orders.by_country")
        .fetch_all(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("54000"),
        "{e}"
    );
    let e = sqlx::query("SELECT 1 FROM orders.nope")
        .fetch_all(&mut conn)
        .await
        .unwrap_err();
    let db = e.as_database_error().unwrap();
    assert_eq!(db.code().as_deref(), Some("42P01"));
    let pg = db.downcast_ref::<sqlx::postgres::PgDatabaseError>();
    assert!(
        matches!(
            pg.position(),
            Some(sqlx::postgres::PgErrorPosition::Original(15))
        ),
        "{:?}",
        pg.position()
    );
    let n: i64 = sqlx::query_scalar("SELECT n FROM orders.overall")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(n > 0);
}

/// Reads every view with psycopg (`LAMBDA_TEST_PSYCOPG`: a Python with psycopg 3, which
/// `.ci/run` makes) and prints each as JSON: `{view: [{column: value}]}`, times in ISO 8601.
const PSYCOPG_SCRIPT: &str = r#"
import datetime, json, sys
import psycopg
views = sys.argv[2].split(",")
out = {}
with psycopg.connect(sys.argv[1], user="python") as conn:
    for view in views:
        cur = conn.execute(f"SELECT * FROM orders.{view}")
        cols = [d.name for d in cur.description]
        out[view] = [
            {c: (v.isoformat() if isinstance(v, datetime.datetime) else v) for c, v in zip(cols, row)}
            for row in cur.fetchall()
        ]
    cur = conn.execute("SELECT count(*) FROM orders.by_country WHERE country = %s", ("DE",))
    out["_de"] = cur.fetchone()[0]
print(json.dumps(out))
"#;

/// A value psycopg decoded (times as ISO 8601) as the HTTP API's JSON value `like`.
fn same_json(got: &Value, like: &Value) -> bool {
    match (got, like) {
        (Value::String(g), Value::String(l)) => {
            match (
                chrono::DateTime::parse_from_rfc3339(g),
                chrono::DateTime::parse_from_rfc3339(l),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => g == l,
            }
        }
        (Value::Number(g), Value::Number(l)) => g.as_f64() == l.as_f64(),
        _ => got == like,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_reads_every_view_exactly_as_the_http_api() {
    let Some(python) = service("LAMBDA_TEST_PSYCOPG") else {
        return;
    };
    let (_dir, server, sql, client) = loaded(SQL_ONLY, None).await;
    let url = format!("{sql}/lambda");
    let mut last = String::new();
    for _ in 0..20 {
        let mut before = serde_json::Map::new();
        for view in VIEWS {
            before.insert(
                view.into(),
                get_view(&client, &server, view).await["rows"].clone(),
            );
        }
        let out = Command::new(&python)
            .args(["-c", PSYCOPG_SCRIPT, &url, &VIEWS.join(",")])
            .output()
            .expect("the psycopg Python runs");
        assert!(
            out.status.success(),
            "psycopg failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut after = serde_json::Map::new();
        for view in VIEWS {
            after.insert(
                view.into(),
                get_view(&client, &server, view).await["rows"].clone(),
            );
        }
        if before != after {
            continue;
        }
        let mut mismatch = None;
        for view in VIEWS {
            let http = before[view].as_array().unwrap();
            let rows = got[view].as_array().unwrap();
            let mut unmatched: Vec<&Value> = rows.iter().collect();
            for row in http {
                let obj = row.as_object().unwrap();
                let found = unmatched.iter().position(|r| {
                    let r = r.as_object().unwrap();
                    r.len() == obj.len()
                        && obj
                            .iter()
                            .all(|(k, v)| r.get(k).is_some_and(|g| same_json(g, v)))
                });
                match found {
                    Some(i) => {
                        unmatched.swap_remove(i);
                    }
                    None => mismatch = Some(format!("{view}: HTTP row {row} not read by psycopg")),
                }
            }
            if rows.len() != http.len() {
                mismatch = Some(format!(
                    "{view}: {} rows by psycopg, {} by HTTP",
                    rows.len(),
                    http.len()
                ));
            }
        }
        let de = before["by_country"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["country"] == "DE")
            .count();
        if got["_de"].as_u64() != Some(de as u64) {
            mismatch = Some(format!(
                "{} DE rows by psycopg with a bind, {de} by HTTP",
                got["_de"]
            ));
        }
        match mismatch {
            None => return,
            Some(m) => last = m,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("psycopg never read what the HTTP API answered: {last}");
}

/// The SQL rows are the HTTP rows, in order, floats within rounding.
fn near(sql: &[BTreeMap<String, String>], http: &[Value]) {
    assert_eq!(sql.len(), http.len(), "{sql:?}\n{http:?}");
    for (s, h) in sql.iter().zip(http) {
        for (k, v) in h.as_object().unwrap() {
            let cell = &s[k];
            let alike = match (v.as_f64(), cell.parse::<f64>()) {
                (Some(x), Ok(y)) if !v.is_u64() => crate::orders::close(x, y),
                _ => same(cell, v),
            };
            assert!(alike, "{k}: SQL {cell}, HTTP {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn set_lambda_as_of_reads_the_views_as_they_were_served() {
    let (_dir, server, sql, client) = loaded(SQL_ONLY, None).await;
    let then = get_view(&client, &server, "by_country").await;
    let at = then["as_of"]["at"].as_str().unwrap().to_string();
    let mut rng = Rng(21);
    let evs = events(&mut rng, 200, 10_000);
    let more = send(&client, &server, &mut rng, &evs).await;
    assert!(!more.is_empty());
    // Over SQL as over HTTP: the same computation of the answer served then (the HTTP one is
    // checked against the answers saved live in tests/it/travel.rs). Rows alike but for
    // float rounding: a segment may be sealed between the two reads.
    let url = server.url(&format!(
        "/v1/views/orders/by_country?as_of={}",
        at.replace(':', "%3A").replace('+', "%2B")
    ));
    let then = crate::support::get_json(&client, url).await;
    assert_eq!(then["as_of"]["at"], at.as_str());
    let set = format!("SET lambda.as_of = '{at}'");
    let out = ok(&psql(
        &sql,
        None,
        &["-c", &set, "-c", "SELECT * FROM orders.by_country"],
    ));
    near(&table(&out), then["rows"].as_array().unwrap());
    // A point query (the row index's path) and SHOW, in the same session.
    let out = ok(&psql(
        &sql,
        None,
        &[
            "-c",
            &set,
            "-c",
            "SELECT * FROM orders.by_country WHERE country = 'DE'",
            "-c",
            "SHOW lambda.as_of",
        ],
    ));
    let de: Vec<Value> = then["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["country"] == "DE")
        .cloned()
        .collect();
    assert!(!de.is_empty());
    let (rows, shown) = out.trim_end().rsplit_once('\n').unwrap();
    let shown = shown.to_string();
    let rows = rows.rsplit_once("\nlambda.as_of").map_or(rows, |r| r.0);
    near(&table(rows), &de);
    assert_eq!(shown, at);
    // Back to now with '', and a malformed instant is refused.
    let mut agreed = false;
    for _ in 0..20 {
        let before = get_view(&client, &server, "overall").await["rows"][0]["n"].clone();
        let out = ok(&psql(
            &sql,
            None,
            &[
                "-c",
                "SET lambda.as_of = ''",
                "-c",
                "SELECT n FROM orders.overall",
            ],
        ));
        let after = get_view(&client, &server, "overall").await["rows"][0]["n"].clone();
        if before == after {
            assert_eq!(table(&out)[0]["n"], after.to_string());
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agreed, "the live answer kept changing");
    let bad = psql(&sql, None, &["-c", "SET lambda.as_of = 'soonish'"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("lambda.as_of"), "{err}");
}
