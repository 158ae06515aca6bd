//! CPU time per event of the plan's hot path — decode → filter → derived column → partials of
//! three views (tumbling + HyperLogLog, hopping, all-time + stddev) — on NDJSON events cut into
//! micro-batches of 1k, 10k and 100k, as the speed layer runs it; then the same at 10k with a
//! lookup join of a 1M-row table (each event's user → a tier, read by a derived column)
//! against the same pipeline without it, and what finding a segment's late events costs at its
//! seal (the restatement ledger). Prints figures; asserts nothing. `PLAN_BENCH_EVENTS`
//! overrides the 1M events (e.g. for a quick debug run with `cargo test --bench plan`).

use std::time::{Duration, Instant};

use std::sync::Arc;

use lambda_ctl::plan::{LookupSet, LookupTable, Plan, Restating};
use lambda_ctl::spec::pipeline::aggregate;
use lambda_ctl::spec::pipeline::parse_path;
use lambda_ctl::spec::{
    Archive, ColumnType, FileFormat, Format, Lookup, LookupSource, Metric, OnMissing, Pipeline,
    Source, View, Window,
};
use polars::prelude::{Column, DataFrame, DataType};

fn pipeline() -> Pipeline {
    let columns: Vec<(String, ColumnType)> = [
        ("event_id", ColumnType::String),
        ("ts", ColumnType::Timestamp),
        ("page", ColumnType::String),
        ("user_id", ColumnType::String),
        ("country", ColumnType::String),
        ("latency_ms", ColumnType::Float),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let metrics = |ms: &[(&str, &str)]| {
        ms.iter()
            .map(|(name, agg)| Metric {
                name: name.to_string(),
                aggregate: aggregate(agg, &[], false).expect("bench aggregates parse"),
            })
            .collect()
    };
    let minutes = |m: u64| Duration::from_secs(60 * m);
    Pipeline {
        name: "clicks".into(),
        description: None,
        file: "pipelines/clicks.yaml".into(),
        source: Source::Http,
        format: Format::Json,
        schema: columns,
        paths: Default::default(),
        event_time: "ts".into(),
        event_id: Some("event_id".into()),
        dedupe_window: Duration::from_secs(86_400),
        partitions: 1,
        partition_key: None,
        buffer: None,
        filter: Some("latency_ms >= 0".into()),
        columns: vec![("section".into(), "split_part(page, '/', 2)".into())],
        lookups: vec![],
        archive: Archive {
            segment_rows: 500_000,
            segment_age: Duration::from_secs(60),
        },
        views: vec![
            View {
                name: "sections".into(),
                group_by: vec!["section".into()],
                window: Window::Tumbling { size: minutes(1) },
                metrics: metrics(&[
                    ("views", "count()"),
                    ("users", "approx_count_distinct(user_id)"),
                ]),
                sinks: Vec::new(),
            },
            View {
                name: "latency".into(),
                group_by: vec!["country".into()],
                window: Window::Hopping {
                    size: minutes(10),
                    every: minutes(1),
                },
                metrics: metrics(&[
                    ("events", "count()"),
                    ("avg_latency", "avg(latency_ms)"),
                    ("max_latency", "max(latency_ms)"),
                ]),
                sinks: Vec::new(),
            },
            View {
                name: "overall".into(),
                group_by: vec!["country".into()],
                window: Window::All,
                metrics: metrics(&[("events", "count()"), ("latency_sd", "stddev(latency_ms)")]),
                sinks: Vec::new(),
            },
        ],
    }
}

/// Deterministic pseudo-random numbers (xorshift), so every run sees the same events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` NDJSON lines, ~1 000 events per second of event time, 1 % with negative latency.
fn events(n: usize) -> Vec<String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let countries = ["DE", "FR", "US", "GB", "JP", "BR", "IN", "NL", "SE", "ES"];
    let sections = ["products", "cart", "search", "account", "blog", "help"];
    let start = 1_714_564_800_000i64;
    (0..n)
        .map(|i| {
            let r = rng.next();
            let ts = start + i as i64 + (r % 500) as i64;
            let latency = if r.is_multiple_of(100) {
                -1.0
            } else {
                ((r >> 20) % 200_000) as f64 / 100.0 + 0.25
            };
            format!(
                r#"{{"event_id":"e-{i}","ts":"{}","page":"/{}/{}","user_id":"u-{}","country":"{}","latency_ms":{latency}}}"#,
                chrono::DateTime::from_timestamp_millis(ts)
                    .expect("in range")
                    .format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                sections[(r >> 8) as usize % sections.len()],
                (r >> 16) % 500,
                (r >> 24) % 100_000,
                countries[(r >> 40) as usize % countries.len()],
            )
        })
        .collect()
}

/// The same pipeline reading the same values from nested events (`path:` columns).
fn nested_pipeline() -> Pipeline {
    let mut p = pipeline();
    for (col, path) in [
        ("ts", "$.meta.ts"),
        ("page", "$.request.page"),
        ("user_id", "$.request.user.id"),
        ("country", "$.geo.country"),
        ("latency_ms", "$.timings[1].ms"),
    ] {
        p.paths.insert(
            col.to_string(),
            parse_path(path).expect("bench paths parse"),
        );
    }
    p
}

/// `events(n)` nested the way `nested_pipeline` reads them, with unrelated fields beside.
fn nested_events(n: usize) -> Vec<String> {
    events(n)
        .into_iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(&line).expect("bench events");
            serde_json::json!({
                "event_id": v["event_id"],
                "meta": {"ts": v["ts"], "source": "web"},
                "request": {"page": v["page"], "method": "GET", "user": {"id": v["user_id"], "tier": "free"}},
                "geo": {"country": v["country"], "city": null},
                "timings": [{"ms": 0.5}, {"ms": v["latency_ms"]}],
            })
            .to_string()
        })
        .collect()
}

/// Rows of the bench's lookup table: every user of `events` (100k) and 900k more.
const LOOKUP_ROWS: usize = 1_000_000;

/// The pipeline with a derived column `tier` read from a 1M-row lookup `users` (keyed by
/// `user_id`), counted by the `sections` view; without `lookup`, the same column and metric
/// from the event itself (the same work but the join).
fn lookup_pipeline(lookup: bool) -> Pipeline {
    let mut p = pipeline();
    let source = if lookup { "users.tier" } else { "user_id" };
    p.columns.push(("tier".into(), source.into()));
    p.views[0].metrics.push(Metric {
        name: "tiers".into(),
        aggregate: aggregate("approx_count_distinct(tier)", &[], false).expect("parses"),
    });
    if lookup {
        p.lookups.push(Lookup {
            name: "users".into(),
            from: LookupSource::File {
                path: "reference/users.parquet".into(),
                format: FileFormat::Parquet,
                options: Default::default(),
            },
            key: "user_id".into(),
            on: "user_id".into(),
            schema: vec![
                ("user_id".into(), ColumnType::String),
                ("tier".into(), ColumnType::String),
            ],
            refresh: None,
            on_missing: OnMissing::Null,
            valid: None,
        });
    }
    p
}

/// CPU per event (decode + partials, 10k batches) with and without the 1M-row lookup join.
fn lookup_figure(lines: &[String]) {
    let plain = Plan::compile(&lookup_pipeline(false)).expect("compiles");
    let joined_pipeline = lookup_pipeline(true);
    let joined = Plan::compile(&joined_pipeline).expect("compiles");
    let tiers = ["free", "pro", "team", "enterprise"];
    let built = Instant::now();
    let frame = DataFrame::new_infer_height(vec![
        Column::new(
            "user_id".into(),
            (0..LOOKUP_ROWS)
                .map(|i| format!("u-{i}"))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "tier".into(),
            (0..LOOKUP_ROWS)
                .map(|i| tiers[i % tiers.len()])
                .collect::<Vec<_>>(),
        ),
    ])
    .expect("lookup frame");
    let table = LookupTable::new(&joined_pipeline.lookups[0], "bench", frame).expect("indexes");
    let index_ms = built.elapsed().as_millis();
    let set = LookupSet::new(vec![Arc::new(table)]);
    let none = LookupSet::none();
    let bodies = bodies(lines, 10_000);
    let per_event = |plan: &Plan, set: &LookupSet| {
        for body in bodies.iter().take(2) {
            plan.partials_all(plan.decode(body).events, set)
                .expect("partials");
        }
        let m = measure(|| {
            for body in &bodies {
                plan.partials_all(plan.decode(body).events, set)
                    .expect("partials");
            }
        });
        m.cpu.as_nanos() as f64 / lines.len() as f64
    };
    // Interleaved twice, the better of each, so a noisy neighbour weighs on both alike.
    let (a1, b1) = (per_event(&plain, &none), per_event(&joined, &set));
    let (a2, b2) = (per_event(&plain, &none), per_event(&joined, &set));
    let (without, with) = (a1.min(a2), b1.min(b2));
    println!(
        "lookup join, 10k batches: {without:.0} ns/event without, {with:.0} ns/event with a \
         {LOOKUP_ROWS}-row table ({:+.1} %; indexed once in {index_ms} ms)",
        (with / without - 1.0) * 100.0
    );
}

/// What finding a segment's late events costs at its seal (the restatement ledger), on a
/// 100k-event segment over every view, with the other 900k events served as one merged frame
/// per view: when none is late (the common case: one comparison per event and view), and when
/// 1 % arrived a day after their windows ended (before/after rows of the windows they touched).
fn late_figure(plan: &Plan, lines: &[String]) {
    let n = lines.len();
    let split = n - n / 10;
    let decoded = |part: &[String]| {
        let bodies = bodies(part, 10_000);
        let frames: Vec<DataFrame> = bodies.iter().map(|b| plan.decode(b).events).collect();
        let mut df = frames[0].clone();
        for f in &frames[1..] {
            df.vstack_mut(f).expect("same schema");
        }
        df
    };
    let none = LookupSet::none();
    let views = plan.pipeline().views.len();
    let others: Vec<Vec<DataFrame>> = {
        let parts = plan
            .partials_all(decoded(&lines[..split]), &none)
            .expect("partials");
        (0..views)
            .map(|v| vec![plan.merge(v, vec![parts[v].clone()]).expect("merge")])
            .collect()
    };
    let segment = decoded(&lines[split..]);
    let ts = segment
        .column("ts")
        .expect("ts")
        .cast(&DataType::Int64)
        .expect("ms");
    let ts = ts.i64().expect("i64");
    let arrivals = |late_every: Option<usize>| {
        let arrival: Vec<i64> = ts
            .into_no_null_iter()
            .enumerate()
            .map(|(i, t)| match late_every {
                Some(k) if i % k == 0 => t + 86_400_000,
                _ => t,
            })
            .collect();
        let mut df = segment.clone();
        df.with_column(Column::new("_arrival".into(), arrival))
            .expect("arrival column");
        df
    };
    let own: Vec<DataFrame> = plan.partials_all(segment.clone(), &none).expect("partials");
    let rows = segment.height();
    let cost = |events: &DataFrame| {
        let mut entries = 0;
        let m = measure(|| {
            for v in 0..views {
                let served = Restating {
                    others: &others[v],
                    own: std::slice::from_ref(&own[v]),
                    horizon_ms: None,
                };
                entries += plan
                    .restated(v, events, "_arrival", &none, &served)
                    .expect("restated")
                    .len();
            }
        });
        (m.cpu.as_nanos() as f64 / rows as f64, m.wall, entries)
    };
    let on_time = arrivals(None);
    let late = arrivals(Some(100));
    let one = arrivals(Some(rows));
    let _ = cost(&on_time);
    let (quiet, quiet_wall, _) = cost(&on_time);
    let (single, single_wall, _) = cost(&one);
    let (busy, busy_wall, entries) = cost(&late);
    println!(
        "late events at seal, {rows}-event segment: none late {quiet:.0} ns/event ({} ms); one late \
         {single:.0} ns/event ({} ms); 1 % a day late {busy:.0} ns/event ({} ms, {entries} entries)",
        quiet_wall.as_millis(),
        single_wall.as_millis(),
        busy_wall.as_millis()
    );
}

/// `lines` as NDJSON request bodies of `batch` events each.
fn bodies(lines: &[String], batch: usize) -> Vec<Vec<u8>> {
    lines
        .chunks(batch)
        .map(|c| {
            let mut body = c.join("\n").into_bytes();
            body.push(b'\n');
            body
        })
        .collect()
}

/// Decode CPU per event over 10k-event batches.
fn decode_ns(plan: &Plan, lines: &[String]) -> f64 {
    let bodies = bodies(lines, 10_000);
    let _ = plan.decode(&bodies[0]);
    let m = measure(|| {
        for body in &bodies {
            assert!(plan.decode(body).rejected.is_empty(), "bench events decode");
        }
    });
    m.cpu.as_nanos() as f64 / lines.len() as f64
}

/// User + system CPU time of the whole process (all threads).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // CLK_TCK is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

struct Measure {
    cpu: Duration,
    wall: Duration,
}

fn measure(f: impl FnOnce()) -> Measure {
    let (cpu, wall) = (cpu_time(), Instant::now());
    f();
    Measure {
        cpu: cpu_time() - cpu,
        wall: wall.elapsed(),
    }
}

fn main() {
    let threads = std::env::var("POLARS_MAX_THREADS").ok();
    if threads.is_none() {
        // First the same run with one polars thread, as when the speed layer runs one
        // partition per core; then this process with polars' default pool.
        let child = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .env("POLARS_MAX_THREADS", "1")
                .status()
        });
        if let Err(e) = child {
            eprintln!("single-thread run failed to start: {e}");
        }
    }
    let n: usize = std::env::var("PLAN_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let plan = Plan::compile(&pipeline()).expect("bench pipeline compiles");
    let none = LookupSet::none();
    let lines = events(n);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "\nplan bench: {n} NDJSON events ({:.0} bytes/event), filter + derived column + 3 views \
         (tumbling 1m + HLL, hopping 10m/1m, all-time + stddev); {} cores, polars threads: {}",
        bytes as f64 / n as f64,
        std::thread::available_parallelism().map_or(1, |p| p.get()),
        threads.as_deref().unwrap_or("default")
    );
    println!(
        "{:>7} {:>14} {:>14} {:>14} {:>12} {:>12} {:>14}",
        "batch",
        "events/s/core",
        "ns/event cpu",
        "events/s wall",
        "decode ns",
        "partials ns",
        "+absorb ns"
    );
    for batch in [1_000usize, 10_000, 100_000] {
        let bodies = bodies(&lines, batch);
        // Warm-up: allocator, polars thread pool, lazy statics.
        for body in bodies.iter().take(2) {
            let d = plan.decode(body);
            plan.partials_all(d.events, &none).expect("partials");
        }
        let mut decoded = Vec::with_capacity(bodies.len());
        let decode = measure(|| {
            for body in &bodies {
                decoded.push(plan.decode(body).events);
            }
        });
        let mut partials = Vec::with_capacity(bodies.len());
        let aggregate = measure(|| {
            for events in decoded {
                partials.push(plan.partials_all(events, &none).expect("partials"));
            }
        });
        // What the speed layer does next: absorb each batch's partials into its segment's
        // in-memory accumulators.
        let mut accs: Vec<_> = (0..plan.pipeline().views.len())
            .map(|v| plan.accumulator(v))
            .collect();
        let absorb = measure(|| {
            for parts in &partials {
                for (acc, p) in accs.iter_mut().zip(parts) {
                    acc.absorb(p).expect("absorb");
                }
            }
        });
        let cpu = decode.cpu + aggregate.cpu;
        let wall = decode.wall + aggregate.wall;
        let per = |d: Duration| d.as_nanos() as f64 / n as f64;
        println!(
            "{:>7} {:>14.0} {:>14.0} {:>14.0} {:>12.0} {:>12.0} {:>14.0}",
            batch,
            n as f64 / cpu.as_secs_f64(),
            per(cpu),
            n as f64 / wall.as_secs_f64(),
            per(decode.cpu),
            per(aggregate.cpu),
            per(absorb.cpu),
        );
    }
    lookup_figure(&lines);
    late_figure(&plan, &lines);
    let nested_plan = Plan::compile(&nested_pipeline()).expect("nested pipeline compiles");
    let nested = nested_events(n);
    let nested_bytes: usize = nested.iter().map(|l| l.len() + 1).sum();
    println!(
        "decode, 10k batches: flat {:.0} ns/event; nested ({:.0} bytes/event, 5 path columns up to 3 deep) {:.0} ns/event",
        decode_ns(&plan, &lines),
        nested_bytes as f64 / n as f64,
        decode_ns(&nested_plan, &nested)
    );
}
