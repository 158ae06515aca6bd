//! The `generator` source: realistic synthetic events for any pipeline schema, for demos and
//! benchmarks. Values are chosen from the column's type and name (a `country` column gets
//! country codes, a `*latency*` column a long-tailed distribution, `user_id` a skewed set of
//! users), so views over generated data look like views over real traffic.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::spec::{ColumnType, Format, JsonPath, PathStep, Pipeline};
use crate::speed::runtime::PipelineRuntime;

/// Feeds `rt` at `rate` events per second until shutdown, through the same door as HTTP.
pub async fn run(rt: Arc<PipelineRuntime>, rate: f64, shutdown: CancellationToken) {
    let mut generator = Generator::new(&rt.pipeline, now_ms() as u64);
    let tick = Duration::from_millis(if rate >= 100.0 { 50 } else { 200 });
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = std::time::Instant::now();
    let mut sent = 0f64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let due = started.elapsed().as_secs_f64() * rate - sent;
        let n = due.floor().min(rate.max(1.0)) as usize;
        if n == 0 {
            continue;
        }
        sent += n as f64;
        let body = Bytes::from(generator.batch(n, now_ms()));
        if let Err(e) = rt.ingest(body).await {
            tracing::warn!(pipeline = %rt.pipeline.name, error = %format!("{e:#}"), "generator could not ingest; retrying next tick");
        }
    }
}

/// A deterministic stream of synthetic events for one pipeline.
pub struct Generator {
    columns: Vec<(String, ColumnType)>,
    event_time: String,
    /// The pipeline's `event_id` column, whatever its name: always a fresh, unique id (an
    /// event without one is a dead letter).
    event_id: Option<String>,
    format: Format,
    /// Nested columns (`path:`): the generated event puts their values there.
    paths: Vec<Option<JsonPath>>,
    rng: u64,
    seq: u64,
    /// Prefix making event ids unique across restarts of the generator.
    run: u64,
}

const PAGES: &[&str] = &[
    "/home",
    "/home",
    "/home",
    "/products/1",
    "/products/2",
    "/products/3",
    "/cart",
    "/checkout",
    "/search",
    "/blog/rust",
    "/blog/lambda",
    "/account/settings",
];
const COUNTRIES: &[&str] = &[
    "DE", "US", "FR", "GB", "NL", "IN", "BR", "JP", "US", "DE", "US",
];
const WORDS: &[&str] = &["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];

impl Generator {
    pub fn new(pipeline: &Pipeline, seed: u64) -> Self {
        Generator {
            columns: pipeline.schema.clone(),
            event_time: pipeline.event_time.clone(),
            event_id: pipeline.event_id.clone(),
            format: pipeline.format,
            paths: pipeline
                .schema
                .iter()
                .map(|(c, _)| pipeline.paths.get(c).cloned())
                .collect(),
            rng: seed | 1,
            seq: 0,
            run: seed,
        }
    }

    /// `n` events with event times around `now_ms`, as NDJSON or CSV (with header) per the
    /// pipeline's format. About 1 % arrive late (up to an hour behind).
    pub fn batch(&mut self, n: usize, now_ms: i64) -> Vec<u8> {
        let mut out = String::with_capacity(n * 128);
        if self.format == Format::Csv {
            let header: Vec<&str> = self.columns.iter().map(|(c, _)| c.as_str()).collect();
            out.push_str(&header.join(","));
            out.push('\n');
        }
        for _ in 0..n {
            self.seq += 1;
            let late = self.next().is_multiple_of(100);
            let ts = now_ms
                - if late {
                    (self.next() % 3_600_000) as i64
                } else {
                    (self.next() % 500) as i64
                };
            let values: Vec<(usize, String)> = (0..self.columns.len())
                .map(|i| (i, self.value(i, ts)))
                .collect();
            match self.format {
                Format::Json if self.paths.iter().any(Option::is_some) => {
                    out.push_str(&self.nested(&values).to_string());
                    out.push('\n');
                }
                Format::Json => {
                    out.push('{');
                    for (k, (i, v)) in values.iter().enumerate() {
                        if k > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "\"{}\":{}", self.columns[*i].0, v);
                    }
                    out.push_str("}\n");
                }
                Format::Csv => {
                    let cells: Vec<String> = values
                        .into_iter()
                        .map(|(_, v)| v.trim_matches('"').to_string())
                        .collect();
                    out.push_str(&cells.join(","));
                    out.push('\n');
                }
            }
        }
        out.into_bytes()
    }

    /// One event with each column's value at its path; metadata columns (`from: meta.KEY`) go
    /// where a broker source puts them, under `$meta`, so an example of a broker pipeline can
    /// be generated too.
    fn nested(&self, values: &[(usize, String)]) -> serde_json::Value {
        let mut event = serde_json::Value::Object(Default::default());
        for (i, v) in values {
            let value: serde_json::Value = serde_json::from_str(v).unwrap_or_default();
            let steps = match &self.paths[*i] {
                Some(p) => p.0.clone(),
                None => vec![PathStep::Key(self.columns[*i].0.clone())],
            };
            let mut at = &mut event;
            for step in steps {
                at = match step {
                    PathStep::Key(k) => {
                        if !at.is_object() {
                            *at = serde_json::Value::Object(Default::default());
                        }
                        at.as_object_mut()
                            .expect("made an object above")
                            .entry(k)
                            .or_insert(serde_json::Value::Null)
                    }
                    PathStep::Index(n) => {
                        if !at.is_array() {
                            *at = serde_json::Value::Array(Vec::new());
                        }
                        let a = at.as_array_mut().expect("made an array above");
                        if a.len() <= n {
                            a.resize(n + 1, serde_json::Value::Null);
                        }
                        &mut a[n]
                    }
                };
            }
            *at = value;
        }
        event
    }

    /// One JSON-encoded value for column `i`.
    fn value(&mut self, i: usize, ts: i64) -> String {
        let (name, ty) = (self.columns[i].0.clone(), self.columns[i].1);
        let lname = name.to_ascii_lowercase();
        match ty {
            ColumnType::Timestamp if name == self.event_time => format!("{ts}"),
            ColumnType::Timestamp => format!("{}", ts - (self.next() % 86_400_000) as i64),
            ColumnType::Bool => format!("{}", self.next().is_multiple_of(2)),
            ColumnType::Int => format!("{}", self.skewed(1000)),
            ColumnType::Float if lname.contains("latency") || lname.contains("duration") => {
                // Log-normal-ish: most requests fast, a long tail of slow ones.
                let u = self.unit();
                format!("{:.3}", 20.0 * (3.0 * u * u * u).exp())
            }
            ColumnType::Float => format!("{:.2}", self.unit() * 200.0),
            ColumnType::String
                if self.event_id.as_deref() == Some(name.as_str())
                    || lname == "event_id"
                    || lname.ends_with("_id") && lname.starts_with("event")
                    || lname == "id" =>
            {
                format!("\"{:x}-{}\"", self.run, self.seq)
            }
            ColumnType::String
                if lname.contains("page") || lname.contains("path") || lname.contains("url") =>
            {
                format!("\"{}\"", PAGES[self.next() as usize % PAGES.len()])
            }
            ColumnType::String if lname.contains("country") => {
                format!("\"{}\"", COUNTRIES[self.next() as usize % COUNTRIES.len()])
            }
            ColumnType::String
                if lname.contains("user")
                    || lname.contains("customer")
                    || lname.contains("device") =>
            {
                format!("\"{}{}\"", &lname[..1], self.skewed(5000))
            }
            ColumnType::String => format!("\"{}\"", WORDS[self.next() as usize % WORDS.len()]),
        }
    }

    /// Skewed towards small values, like real popularity distributions.
    fn skewed(&mut self, max: u64) -> u64 {
        let u = self.unit();
        ((u * u * u) * max as f64) as u64
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// xorshift64*: fast, deterministic, good enough for synthetic data.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    #[test]
    fn generates_valid_events_for_the_example_pipeline() {
        let project = spec::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        let p = project.pipeline("clicks").unwrap();
        let mut g = Generator::new(p, 42);
        let bytes = g.batch(100, 1_700_000_000_000);
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        let mut ids = std::collections::HashSet::new();
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for (col, _) in &p.schema {
                assert!(v.get(col).is_some(), "{col} missing in {line}");
            }
            let ts = v["ts"].as_i64().unwrap();
            assert!(ts <= 1_700_000_000_000 && ts > 1_700_000_000_000 - 3_600_000);
            assert!(v["latency_ms"].as_f64().unwrap() >= 0.0);
            assert!(
                ids.insert(v["event_id"].as_str().unwrap().to_string()),
                "duplicate id"
            );
        }
    }

    #[test]
    fn nested_columns_are_generated_at_their_paths() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/orders-servicebus");
        let project = spec::load(&root).unwrap();
        let p = project.pipeline("orders").unwrap();
        let bytes = Generator::new(p, 7).batch(50, 1_700_000_000_000);
        let first: serde_json::Value =
            serde_json::from_slice(bytes.split(|c| *c == b'\n').next().unwrap()).unwrap();
        assert!(first["order"]["payment"]["amount"].is_f64(), "{first}");
        assert!(first["order"]["lines"][0]["sku"].is_string(), "{first}");
        let decoded = crate::plan::Plan::compile(p).unwrap().decode(&bytes);
        assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
        assert_eq!(decoded.events.height(), 50);
    }
}
