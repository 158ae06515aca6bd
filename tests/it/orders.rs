//! The `orders` pipeline shared by the speed and lambda tests: its spec, generated events
//! (out of order, days late, redelivered, malformed, filtered), the HTTP calls, and the
//! independent oracle — plain loops over the acknowledged events — every view is checked
//! against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Rng, Server};

pub const PIPELINE: &str = r#"
name: orders
source:
  type: http
schema:
  id: string
  ts: timestamp
  user: string
  country: string
  amount: float
event_time: ts
event_id: id
filter: "amount >= 0"
archive:
  segment_rows: 300
  segment_age: 1s
views:
  - name: by_country
    group_by: [country]
    window: 1m
    metrics:
      n: count()
      total: sum(amount)
      lo: min(amount)
      hi: max(amount)
      mean: avg(amount)
  - name: hop
    window: {hopping: {size: 10m, every: 5m}}
    metrics:
      n: count()
      total: sum(amount)
  - name: sessions
    group_by: [user]
    window: {session: {gap: 5m}}
    metrics:
      n: count()
      first_country: first(country)
      last_country: last(country)
  - name: overall
    window: all
    metrics:
      n: count()
      sd: stddev(amount)
      var: variance(amount)
      users: approx_count_distinct(user)
      median: approx_quantile(amount, 0.5)
"#;

/// The `Content-Type` of an events POST (the server refuses a body without one).
pub const NDJSON: &str = "application/x-ndjson";

pub const BASE_MS: i64 = 1_763_719_200_000; // 2025-11-21T10:00:00Z
pub const GAP_MS: i64 = 300_000;

#[derive(Clone, Debug)]
pub struct Ev {
    pub id: String,
    pub ts: i64,
    pub user: String,
    pub country: String,
    pub amount: f64,
}

impl Ev {
    pub fn line(&self, rng: &mut Rng) -> String {
        // Half the events carry RFC 3339 times, half epoch milliseconds.
        let ts = if rng.below(2) == 0 {
            Value::String(
                chrono::DateTime::from_timestamp_millis(self.ts)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            )
        } else {
            Value::from(self.ts)
        };
        serde_json::json!({"id": self.id, "ts": ts, "user": self.user, "country": self.country, "amount": self.amount}).to_string()
    }
}

pub fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/orders.yaml"), PIPELINE).unwrap();
    dir
}

/// Events with unique ids and times (`7k + 1` ms: no two differ by exactly the session gap),
/// shuffled, 10 % of them days late.
pub fn events(rng: &mut Rng, n: usize, id_base: usize) -> Vec<Ev> {
    let countries = ["DE", "US", "FR", "JP"];
    let mut slots: BTreeSet<i64> = BTreeSet::new();
    while slots.len() < n {
        let late = if rng.below(10) == 0 {
            3 * 86_400_000
        } else {
            0
        };
        slots.insert(BASE_MS - late + 7 * rng.below(500_000) as i64 + 1);
    }
    let mut evs: Vec<Ev> = slots
        .into_iter()
        .enumerate()
        .map(|(i, ts)| Ev {
            id: format!("e{}", id_base + i),
            ts,
            user: format!("u{}", rng.below(40)),
            country: countries[rng.below(4) as usize].to_string(),
            amount: if rng.below(20) == 0 {
                -1.0
            } else {
                (rng.below(100_000) as f64) / 100.0
            },
        })
        .collect();
    for i in (1..evs.len()).rev() {
        evs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    evs
}

pub async fn post(client: &reqwest::Client, server: &Server, body: String) -> Value {
    let resp = client
        .post(server.url("/v1/pipelines/orders/events"))
        .header("content-type", NDJSON)
        .body(body)
        .send()
        .await
        .expect("POST events");
    assert!(
        resp.status().is_success(),
        "POST answered {}",
        resp.status()
    );
    resp.json().await.unwrap()
}

pub async fn get_view(client: &reqwest::Client, server: &Server, view: &str) -> Value {
    let resp = client
        .get(server.url(&format!("/v1/views/orders/{view}")))
        .send()
        .await
        .expect("GET view");
    assert!(resp.status().is_success(), "GET answered {}", resp.status());
    resp.json().await.unwrap()
}

pub fn ms(v: &Value) -> Option<i64> {
    v.as_str().map(|s| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    })
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Waits until the `overall` view counts `n` events (the ack → visible path).
pub async fn wait_for_count(client: &reqwest::Client, server: &Server, n: u64) {
    let start = Instant::now();
    loop {
        let v = get_view(client, server, "overall").await;
        let got = v["rows"].get(0).and_then(|r| r["n"].as_u64()).unwrap_or(0);
        if got == n {
            return;
        }
        assert!(got <= n, "counted {got} events, only {n} were acknowledged");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {got} of {n} acknowledged events visible after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Compares every view with plain-loop computations over `acked` (the accepted, unique events).
pub async fn check_views(client: &reqwest::Client, server: &Server, acked: &[Ev]) {
    check_views_after(client, server, acked, None).await;
}

/// [`check_views`] after a retention with `horizon` (epoch ms): windows that ended at or
/// before it are served by no layer; the all-time view keeps everything.
pub async fn check_views_after(
    client: &reqwest::Client,
    server: &Server,
    acked: &[Ev],
    horizon: Option<i64>,
) {
    let kept: Vec<&Ev> = acked.iter().filter(|e| e.amount >= 0.0).collect();
    let retired = |end: i64| horizon.is_some_and(|h| end <= h);

    // by_country: 1m tumbling.
    let mut oracle: BTreeMap<(i64, String), Vec<f64>> = BTreeMap::new();
    for e in &kept {
        oracle
            .entry((e.ts.div_euclid(60_000) * 60_000, e.country.clone()))
            .or_default()
            .push(e.amount);
    }
    oracle.retain(|(start, _), _| !retired(start + 60_000));
    let v = get_view(client, server, "by_country").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), oracle.len(), "by_country windows");
    let mut prev: Option<(i64, String)> = None;
    for r in rows {
        let key = (
            ms(&r["window_start"]).unwrap(),
            r["country"].as_str().unwrap().to_string(),
        );
        assert!(
            prev.as_ref().is_none_or(|p| *p < key),
            "rows ordered by window_start then keys"
        );
        assert_eq!(ms(&r["window_end"]), Some(key.0 + 60_000));
        let xs = &oracle[&key];
        assert_eq!(r["n"].as_u64().unwrap(), xs.len() as u64, "{key:?}");
        assert!(
            close(r["total"].as_f64().unwrap(), xs.iter().sum()),
            "{key:?} sum"
        );
        assert_eq!(
            r["lo"].as_f64().unwrap(),
            xs.iter().cloned().fold(f64::INFINITY, f64::min)
        );
        assert_eq!(
            r["hi"].as_f64().unwrap(),
            xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        );
        assert!(close(
            r["mean"].as_f64().unwrap(),
            xs.iter().sum::<f64>() / xs.len() as f64
        ));
        prev = Some(key);
    }

    // hop: 10m windows every 5m — each event in two windows.
    let mut hop: BTreeMap<i64, (u64, f64)> = BTreeMap::new();
    for e in &kept {
        let last = e.ts.div_euclid(300_000) * 300_000;
        for start in [last - 300_000, last] {
            let w = hop.entry(start).or_default();
            w.0 += 1;
            w.1 += e.amount;
        }
    }
    hop.retain(|start, _| !retired(start + 600_000));
    let v = get_view(client, server, "hop").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), hop.len(), "hop windows");
    for r in rows {
        let start = ms(&r["window_start"]).unwrap();
        let (n, total) = hop[&start];
        assert_eq!(ms(&r["window_end"]), Some(start + 600_000));
        assert_eq!(r["n"].as_u64().unwrap(), n);
        assert!(close(r["total"].as_f64().unwrap(), total));
    }

    // sessions: per user, split where the gap is 5m or more.
    let mut by_user: HashMap<&str, Vec<&Ev>> = HashMap::new();
    for e in &kept {
        by_user.entry(&e.user).or_default().push(e);
    }
    let mut sessions: BTreeMap<(i64, String), (i64, u64, String, String)> = BTreeMap::new();
    for (user, mut evs) in by_user {
        evs.sort_by_key(|e| e.ts);
        let mut i = 0;
        while i < evs.len() {
            let mut j = i;
            while j + 1 < evs.len() && evs[j + 1].ts - evs[j].ts < GAP_MS {
                j += 1;
            }
            sessions.insert(
                (evs[i].ts, user.to_string()),
                (
                    evs[j].ts + GAP_MS,
                    (j - i + 1) as u64,
                    evs[i].country.clone(),
                    evs[j].country.clone(),
                ),
            );
            i = j + 1;
        }
    }
    sessions.retain(|_, (end, ..)| !retired(*end));
    let v = get_view(client, server, "sessions").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), sessions.len(), "sessions");
    for r in rows {
        let key = (
            ms(&r["window_start"]).unwrap(),
            r["user"].as_str().unwrap().to_string(),
        );
        let (end, n, first, last) = &sessions[&key];
        assert_eq!(ms(&r["window_end"]), Some(*end), "{key:?}");
        assert_eq!(r["n"].as_u64().unwrap(), *n, "{key:?}");
        assert_eq!(r["first_country"].as_str().unwrap(), first, "{key:?}");
        assert_eq!(r["last_country"].as_str().unwrap(), last, "{key:?}");
    }

    // overall: all-time, sample stddev/variance, sketches within their bounds.
    let v = get_view(client, server, "overall").await;
    let r = &v["rows"][0];
    assert!(r["window_start"].is_null() && r["window_end"].is_null());
    let xs: Vec<f64> = kept.iter().map(|e| e.amount).collect();
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    assert_eq!(r["n"].as_u64().unwrap(), xs.len() as u64);
    assert!(
        close(r["var"].as_f64().unwrap(), var),
        "variance {} vs {var}",
        r["var"]
    );
    assert!(close(r["sd"].as_f64().unwrap(), var.sqrt()));
    let users: BTreeSet<&str> = kept.iter().map(|e| e.user.as_str()).collect();
    let est = r["users"].as_f64().unwrap();
    assert!(
        (est - users.len() as f64).abs() <= 0.03 * users.len() as f64 + 1.0,
        "distinct users {est} vs {}",
        users.len()
    );
    let mut sorted = xs.clone();
    sorted.sort_by(f64::total_cmp);
    let rank = 0.5 * (sorted.len() - 1) as f64;
    let (lo, hi) = (sorted[rank.floor() as usize], sorted[rank.ceil() as usize]);
    let median = r["median"].as_f64().unwrap();
    assert!(
        median >= lo * 0.98 - 1e-9 && median <= hi * 1.02 + 1e-9,
        "median {median} vs [{lo}, {hi}]"
    );
}

/// Sends `evs` in random-sized requests, some lines malformed, some redelivered; returns the
/// events acknowledged (each once).
pub async fn send(client: &reqwest::Client, server: &Server, rng: &mut Rng, evs: &[Ev]) -> Vec<Ev> {
    let mut acked = Vec::new();
    let mut i = 0;
    while i < evs.len() {
        let n = (1 + rng.below(120) as usize).min(evs.len() - i);
        let mut lines = Vec::new();
        let mut bad = 0;
        for e in &evs[i..i + n] {
            lines.push(e.line(rng));
            if rng.below(25) == 0 {
                lines.push(
                    [
                        "{not json",
                        r#"{"id":"x","user":"u1"}"#,
                        r#"{"id":"y","ts":"yesterday","amount":1}"#,
                        r#"{"id":"z","ts":5,"amount":"lots"}"#,
                    ][rng.below(4) as usize]
                        .to_string(),
                );
                bad += 1;
            }
        }
        // Redeliver a few events already acknowledged (at-least-once upstream).
        let mut dups = 0;
        if !acked.is_empty() && rng.below(4) == 0 {
            let e: &Ev = &acked[rng.below(acked.len() as u64) as usize];
            lines.push(e.line(rng));
            dups += 1;
        }
        let answer = post(client, server, lines.join("\n") + "\n").await;
        assert_eq!(answer["rejected"].as_u64().unwrap(), bad, "{answer}");
        assert_eq!(answer["accepted"].as_u64().unwrap(), n as u64, "{answer}");
        assert_eq!(answer["duplicates"].as_u64().unwrap(), dups, "{answer}");
        for err in answer["errors"].as_array().unwrap() {
            let line = err["line"].as_u64().unwrap() as usize;
            assert!(line >= 1 && line <= lines.len(), "line number {line}");
            assert!(!err["reason"].as_str().unwrap().is_empty());
        }
        acked.extend_from_slice(&evs[i..i + n]);
        i += n;
    }
    acked
}
