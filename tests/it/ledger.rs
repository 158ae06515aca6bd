//! The restatement ledger from outside: every `orders` event is days older than its windows'
//! ends, so every one of them restates a window that was already served. Between two answers
//! taken at rest, the ledger's entries (`GET /v1/views/{p}/{v}/restatements?from=`) account for
//! every change of every row: their deltas sum to the difference of the answers, metric by
//! metric, and their late-event counts to the oracle's — with a batch publication serving part
//! of the "before", malformed events, redeliveries and filtered events in the stream. `/metrics`
//! and `status` carry the totals; windows without an end (sessions, all-time) have none.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::lambda::{kept, run_batch, wait_for_batch};
use crate::ops::dump_dom;
use crate::orders::{Ev, close, events, get_view, ms, project, send, wait_for_count};
use crate::support::{Rng, Server, eventually, get_json, lambda_ctl, service, wait_for_sealed};

/// A row of a windowed view: (window start, group key as JSON) → metric → value.
type Rows = BTreeMap<(i64, String), BTreeMap<String, Value>>;

/// The rows of `view` as served now, by window and group.
async fn rows(client: &reqwest::Client, server: &Server, view: &str, keys: &[&str]) -> Rows {
    let answer = get_view(client, server, view).await;
    let mut out = Rows::new();
    for r in answer["rows"].as_array().unwrap() {
        let obj = r.as_object().unwrap();
        let key: serde_json::Map<String, Value> = keys
            .iter()
            .map(|k| (k.to_string(), obj[*k].clone()))
            .collect();
        let metrics = obj
            .iter()
            .filter(|(k, _)| !k.starts_with("window_") && !keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert(
            (
                ms(&r["window_start"]).unwrap(),
                Value::Object(key).to_string(),
            ),
            metrics,
        );
    }
    out
}

/// The view's ledger entries recorded from `from` on (RFC 3339), all of them.
async fn ledger(client: &reqwest::Client, server: &Server, view: &str, from: &str) -> Value {
    let url = server.url(&format!(
        "/v1/views/orders/{view}/restatements?from={}&limit=100000",
        urlencode(from)
    ));
    let answer = get_json(client, url).await;
    assert_eq!(answer["truncated"], false, "{answer}");
    answer
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

fn number(v: Option<&Value>) -> f64 {
    v.and_then(Value::as_f64).unwrap_or(0.0)
}

/// Checks that the entries of `ledger` take `before` to `after`: per row and metric, the sum of
/// the deltas is the difference (a missing row or null value is 0), and a row that changed has
/// entries. Returns the late events the entries count per window start.
fn assert_accounts_for(
    view: &str,
    before: &Rows,
    after: &Rows,
    ledger: &Value,
) -> BTreeMap<i64, u64> {
    let mut summed: BTreeMap<(i64, String), BTreeMap<String, f64>> = BTreeMap::new();
    let mut late: BTreeMap<i64, u64> = BTreeMap::new();
    for e in ledger["restatements"].as_array().unwrap() {
        assert_eq!(e["cause"], "late", "{e}");
        let start = ms(&e["window_start"]).unwrap();
        let end = ms(&e["window_end"]).unwrap();
        // Every event here is days late: its lateness is at least the distance to now.
        let lateness = e["max_lateness_ms"].as_i64().unwrap();
        assert!(lateness > 86_400_000, "{e}");
        assert!(end > start, "{e}");
        let n = e["late_events"].as_u64().unwrap();
        assert!(n > 0, "{e}");
        *late.entry(start).or_default() += n;
        let row = summed.entry((start, e["key"].to_string())).or_default();
        for (metric, cell) in e["metrics"].as_object().unwrap() {
            *row.entry(metric.clone()).or_default() += cell["delta"].as_f64().unwrap();
        }
    }
    let keys: std::collections::BTreeSet<_> = before.keys().chain(after.keys()).collect();
    for key in keys {
        let (b, a) = (before.get(key), after.get(key));
        let metrics: std::collections::BTreeSet<&String> =
            b.into_iter().chain(a).flat_map(BTreeMap::keys).collect();
        for m in metrics {
            let diff = number(a.and_then(|r| r.get(m))) - number(b.and_then(|r| r.get(m)));
            let delta = summed.get(key).and_then(|r| r.get(m)).copied();
            match delta {
                Some(d) => assert!(
                    close(d, diff),
                    "{view} {key:?} {m}: deltas sum to {d}, the answers differ by {diff}"
                ),
                None => assert!(
                    diff == 0.0,
                    "{view} {key:?} {m} changed by {diff} without a ledger entry"
                ),
            }
        }
    }
    late
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_accounts_for_every_change_late_events_made() {
    let dir = project();
    let client = reqwest::Client::new();
    let mut rng = Rng(23);
    let server = Server::start(dir.path());

    // Before: a batch publication and speed segments on top of it.
    let first = events(&mut rng, 400, 0);
    let mut acked = send(&client, &server, &mut rng, &first[..250]).await;
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_sealed(&client, &server, "orders", 1).await;
    let run = run_batch(dir.path()).await;
    wait_for_batch(&client, &server, &run).await;
    acked.extend(send(&client, &server, &mut rng, &first[250..]).await);
    wait_for_count(&client, &server, kept(&acked)).await;
    wait_for_sealed(&client, &server, "orders", 1).await;
    let t1 = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let by_country_before = rows(&client, &server, "by_country", &["country"]).await;
    let hop_before = rows(&client, &server, "hop", &[]).await;

    // After: more events into the same (long closed) windows, sealed over several segments.
    let second: Vec<Ev> = events(&mut rng, 500, 10_000);
    let mut later = Vec::new();
    for part in second.chunks(170) {
        let sent = send(&client, &server, &mut rng, part).await;
        later.extend(sent.iter().cloned());
        acked.extend(sent);
        wait_for_count(&client, &server, kept(&acked)).await;
        wait_for_sealed(&client, &server, "orders", 1).await;
    }
    let by_country_after = rows(&client, &server, "by_country", &["country"]).await;
    let hop_after = rows(&client, &server, "hop", &[]).await;

    // The entries since t1 take each answer to the next, row by row and metric by metric.
    let entries = ledger(&client, &server, "by_country", &t1).await;
    let late = assert_accounts_for(
        "by_country",
        &by_country_before,
        &by_country_after,
        &entries,
    );
    let mut oracle: BTreeMap<i64, u64> = BTreeMap::new();
    for e in later.iter().filter(|e| e.amount >= 0.0) {
        *oracle.entry(e.ts.div_euclid(60_000) * 60_000).or_default() += 1;
    }
    assert_eq!(late, oracle, "late events per window of by_country");
    assert_eq!(
        entries["totals"]["late_events"].as_u64(),
        Some(kept(&later)),
        "{}",
        entries["totals"]
    );
    let hop = ledger(&client, &server, "hop", &t1).await;
    let late = assert_accounts_for("hop", &hop_before, &hop_after, &hop);
    let mut oracle: BTreeMap<i64, u64> = BTreeMap::new();
    for e in later.iter().filter(|e| e.amount >= 0.0) {
        let last = e.ts.div_euclid(300_000) * 300_000;
        for start in [last - 300_000, last] {
            *oracle.entry(start).or_default() += 1;
        }
    }
    assert_eq!(
        late, oracle,
        "late events per window of hop (each event in two)"
    );

    // Totals since the start: every kept event was late once per window it is in.
    let all = ledger(&client, &server, "by_country", "2000-01-01T00:00:00Z").await;
    let windows = all["restatements"].as_array().unwrap().len() as u64;
    assert_eq!(all["totals"]["restated_windows"].as_u64(), Some(windows));
    assert_eq!(all["totals"]["late_events"].as_u64(), Some(kept(&acked)));
    let metrics = eventually(
        "the ledger's totals in /metrics",
        std::time::Duration::from_secs(10),
        || async {
            let page = server.metrics(&client).await;
            let want = format!(
                "lambda_late_events_total{{pipeline=\"orders\",view=\"by_country\"}} {}\n",
                kept(&acked)
            );
            page.contains(&want).then_some(page)
        },
    )
    .await;
    assert!(
        metrics.contains(&format!(
            "lambda_restated_windows_total{{pipeline=\"orders\",view=\"by_country\"}} {windows}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "lambda_late_events_total{{pipeline=\"orders\",view=\"hop\"}} {}\n",
            2 * kept(&acked)
        )),
        "{metrics}"
    );
    for view in ["sessions", "overall"] {
        assert!(
            metrics.contains(&format!(
                "lambda_late_events_total{{pipeline=\"orders\",view=\"{view}\"}} 0\n"
            )),
            "{view} has no window ends, so no late events: {metrics}"
        );
    }
    // The dashboard's pipeline row sums the late events of every view.
    if let Some(chromium) = service("LAMBDA_TEST_CHROMIUM") {
        let dom = dump_dom(&chromium, &server.url("/"), &["--dump-dom"]);
        let late = 3 * kept(&acked);
        assert!(
            dom.contains(&format!("data-late=\"{late}\""))
                && dom.contains("data-verified=\"never\""),
            "{dom}"
        );
    }
    let project = dir.path().to_str().unwrap();
    let status = lambda_ctl(&["status", "--json", "--project", project]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let views = status["pipelines"][0]["views"].as_array().unwrap();
    let by_country = views.iter().find(|v| v["name"] == "by_country").unwrap();
    assert_eq!(
        by_country["restated"]["late_events"].as_u64(),
        Some(kept(&acked)),
        "{by_country}"
    );
    let text = lambda_ctl(&["status", "--project", project]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("RESTATED WINDOWS"), "{text}");
    assert!(text.contains("orders.by_country"), "{text}");

    // The CLI shows the same ledger: a table with each metric before → after, or the JSON.
    let cli = |args: &[&str]| {
        let mut all = vec!["restatements"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--server", &server.base, "--project", project]);
        lambda_ctl(&all)
    };
    let out = cli(&["orders.by_country", "--from", &t1, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["restatements"], entries["restatements"]);
    let out = cli(&["orders.hop", "--from", &t1, "--limit", "1"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let first = &hop["restatements"][0];
    let n = &first["metrics"]["n"];
    let shown = |v: &Value| {
        if v.is_null() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    assert!(
        table.contains(&format!("{} → {}", shown(&n["before"]), shown(&n["after"])))
            && table.contains("only the first 1 shown")
            && table.contains(&format!("{} late event(s)", kept(&later) * 2)),
        "{table}"
    );
    for bad in [
        &["orders"][..],
        &["orders.nope"],
        &["orders.hop", "--limit", "0"],
    ] {
        assert_eq!(cli(bad).status.code(), Some(1), "{bad:?}");
    }

    // Mistakes get a 4xx naming them.
    for (path, status) in [
        (
            "/v1/views/orders/by_country/restatements?from=yesterday",
            400,
        ),
        ("/v1/views/orders/by_country/restatements?limit=0", 400),
        ("/v1/views/orders/by_country/restatements?window=1", 400),
        ("/v1/views/orders/nope/restatements", 404),
    ] {
        let r = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(
            !body["error"].as_str().unwrap_or_default().is_empty(),
            "{path}: {body}"
        );
    }
}
