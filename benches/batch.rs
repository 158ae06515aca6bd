//! `cargo bench --bench batch`: a full batch recompute of archived click events — the views
//! people write: a per-minute view with a distinct count, an all-time view with a standard
//! deviation, an hourly view with a quantile — beside plain polars running the same
//! aggregations with its streaming engine over the same Parquet files, then an incremental
//! run with nothing new, and one over a live segment (the next minutes' events, sealed after
//! everything). Each side runs in a fresh child process, so wall time, CPU seconds and peak
//! RSS are its own.
//!
//! `BATCH_BENCH_EVENTS` (default 10 000 000) sets the size; segments hold 500 000 events of
//! one day, 100 pages (skewed), 100 000 users, 8 countries — each from all of the day (a
//! backfill), or with `BATCH_BENCH_ARCHIVE=arrival` each from the day's next slice, as events
//! arriving in time are sealed. With `BATCH_BENCH_PYTHON` naming a
//! Python that has the `polars` and `duckdb` packages, Python polars (streaming engine,
//! `approx_n_unique`) and DuckDB run the same queries over the same files too, printed beside
//! (each figure from the query's start, after the imports). `BATCH_BENCH_DIR` keeps the
//! archive in that directory (and reuses it, each run adding its live segment): `batch DIR`,
//! `polars DIR`, `noop DIR` and `live DIR` then run one side alone, e.g. under a profiler;
//! `BATCH_BENCH_VIEWS=a,b` limits either side to those views.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use lambda_ctl::lake::Lake;
use lambda_ctl::plan::Plan;
use lambda_ctl::state::State;
use polars::prelude::*;

const SEGMENT_ROWS: usize = 500_000;

mod common;
use common::archive::{append_live, archive};

/// The pipeline: the views of issue #17 over the archive's click events.
const SPEC: &str = r#"
name: bench
source:
  type: http
schema:
  ts: timestamp
  user: string
  country: string
  page: string
  amount: float
event_time: ts
filter: "amount >= 0"
views:
  - name: per_page
    group_by: [page]
    window: 1m
    metrics:
      views: count()
      users: approx_count_distinct(user)
      avg_amount: avg(amount)
      max_amount: max(amount)
  - name: per_country
    group_by: [country]
    window: all
    metrics:
      n: count()
      sd: stddev(amount)
      lo: min(amount)
  - name: hourly
    group_by: [country]
    window: 1h
    metrics:
      n: count()
      p95: approx_quantile(amount, 0.95)
"#;

/// Child modes: plain polars, the batch layer's full recompute, a no-op incremental run, an
/// incremental run over the live segment.
const MODES: [&str; 4] = ["polars", "batch", "noop", "live"];

/// The live segment: as many events as an archived one, from the 5 minutes after the latest.
const LIVE_SPAN_MS: i64 = 300_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| MODES.contains(&a.as_str())) {
        let dir = PathBuf::from(&args[pos + 1]);
        let start = Instant::now();
        let groups = match args[pos].as_str() {
            "batch" => batch(&dir, true)?,
            "noop" | "live" => batch(&dir, false)?,
            _ => plain(&dir)?,
        };
        let wall = start.elapsed().as_secs_f64();
        let (cpu, rss) = usage();
        println!("{wall:.3} {cpu:.3} {rss} {groups}");
        return Ok(());
    }
    if args.iter().any(|a| a == "--list") {
        println!("batch: bench");
        return Ok(());
    }
    let events: usize = std::env::var("BATCH_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    // `BATCH_BENCH_DIR`: archive there once and keep it (to profile a child mode by hand).
    let kept = std::env::var_os("BATCH_BENCH_DIR").map(PathBuf::from);
    let temp = tempfile::tempdir()?;
    let dir = kept.as_deref().unwrap_or(temp.path());
    if !dir.join("state.db").exists() {
        let t = Instant::now();
        std::fs::create_dir_all(dir)?;
        prepare(dir, events)?;
        eprintln!(
            "archived {events} events in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    let mut figures = Vec::new();
    for &mode in &MODES[..3] {
        let f = child(mode, dir)?;
        let what = match mode {
            "polars" => "plain polars, streaming",
            "batch" => "batch, full recompute",
            _ => "batch, incremental, nothing new",
        };
        println!(
            "{what:>31}: {events} events, 3 views: wall {:.2}s, CPU {:.2}s, peak RSS {:.0} MB, {} groups",
            f[0],
            f[1],
            f[2] / 1e6,
            f[3]
        );
        figures.push(f);
    }
    let python = match std::env::var("BATCH_BENCH_PYTHON") {
        Ok(python) => peers(&python, dir, figures[0][3])?,
        Err(_) => None,
    };
    // Same groups on every side, or the comparison is meaningless.
    anyhow::ensure!(
        figures.iter().all(|f| f[3] == figures[0][3]),
        "plain polars found {} groups, the batch layer {} (full) and {} (incremental)",
        figures[0][3],
        figures[1][3],
        figures[2][3]
    );
    println!(
        "ratio (full recompute / plain polars): wall {:.2}x, CPU {:.2}x, peak RSS {:.2}x (goals 1.2x, 1.2x, 1.5x); no-op incremental run {:.0} ms (goal 100 ms)",
        figures[1][0] / figures[0][0],
        figures[1][1] / figures[0][1],
        figures[1][2] / figures[0][2],
        figures[2][0] * 1000.0
    );
    if let Some(p) = python {
        println!(
            "ratio (full recompute / Python polars): wall {:.2}x, CPU {:.2}x, peak RSS {:.2}x",
            figures[1][0] / p[0],
            figures[1][1] / p[1],
            figures[1][2] / p[2],
        );
    }
    // What the next nightly run costs: one live segment on top of the publications.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        append_live(&lake, &state, "bench", SEGMENT_ROWS, LIVE_SPAN_MS).await?;
        state.close().await;
        anyhow::Ok(())
    })?;
    let live = child("live", dir)?;
    println!(
        "{:>31}: {SEGMENT_ROWS} events of 5 minutes, 3 views: wall {:.2}s, CPU {:.2}s, peak RSS {:.0} MB, {} partial rows published",
        "batch, incremental, one segment",
        live[0],
        live[1],
        live[2] / 1e6,
        live[3]
    );
    println!(
        "ratio (incremental run over one live segment / full recompute over {} segments): wall {:.3}x, CPU {:.3}x",
        events.div_ceil(SEGMENT_ROWS),
        live[0] / figures[1][0],
        live[1] / figures[1][1],
    );
    Ok(())
}

/// Runs this bench as child `mode` over `dir`: its wall time, CPU seconds, peak RSS (bytes)
/// and groups.
fn child(mode: &str, dir: &Path) -> anyhow::Result<Vec<f64>> {
    let out = Command::new(std::env::current_exe()?)
        .arg(mode)
        .arg(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect())
}

fn plan() -> anyhow::Result<Plan> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("pipelines"))?;
    std::fs::write(dir.path().join("pipelines/bench.yaml"), SPEC)?;
    let project = lambda_ctl::spec::load(dir.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let p = project
        .pipeline("bench")
        .ok_or_else(|| anyhow::anyhow!("no pipeline"))?;
    Ok(Plan::compile(p)?)
}

fn lake_url(dir: &Path) -> String {
    format!("file://{}", dir.join("lake").display())
}

fn state_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("state.db").display())
}

/// Writes `events` pseudo-random events as sealed segments, as the speed layer archives them.
fn prepare(dir: &Path, events: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("lake"))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        // `BATCH_BENCH_ARCHIVE=arrival`: each segment holds the day's next slice.
        let arrival = std::env::var("BATCH_BENCH_ARCHIVE").is_ok_and(|a| a == "arrival");
        let names = ["bench".to_string()];
        archive(&lake, &state, &names, (events, SEGMENT_ROWS), arrival).await?;
        state.close().await;
        anyhow::Ok(())
    })
}

/// The batch layer: `recompute` with its publish and Parquet output; `full` as `run --full`
/// (otherwise incremental on the last publication). The partial rows published.
fn batch(dir: &Path, full: bool) -> anyhow::Result<u64> {
    let plan = Arc::new(plan()?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        // `BATCH_BENCH_VIEWS=a,b`: only those views (to profile one).
        let only: Option<Vec<String>> = std::env::var("BATCH_BENCH_VIEWS")
            .ok()
            .map(|v| v.split(',').map(str::to_string).collect());
        let select = lambda_ctl::batch::Select {
            full,
            views: only.as_deref(),
            ..Default::default()
        };
        let summary =
            lambda_ctl::batch::recompute(plan, &state, &lake, select, &mut |_| {}).await?;
        state.close().await;
        Ok(summary.views.iter().map(|v| v.publication.rows).sum())
    })
}

/// Plain polars: the same filter and aggregations (an exact distinct count, the nearest-rank
/// quantile), each view one query on the streaming engine, over the same segments as the
/// batch layer scans them (`batch::scan`).
fn plain(dir: &Path) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Runtime::new()?;
    let source = rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        let (_, segments) = lambda_ctl::batch::sealed(&state, "bench").await?;
        let source = lambda_ctl::batch::scan::open(&lake, &segments, |_| {}).await?;
        state.close().await;
        anyhow::Ok(source)
    })?;
    let scan = || -> anyhow::Result<LazyFrame> {
        let events = source
            .lazy()?
            .ok_or_else(|| anyhow::anyhow!("no sealed segments"))?;
        Ok(events.filter(col("amount").gt_eq(lit(0.0))))
    };
    let window = |every: &str| col("ts").dt().truncate(lit(every)).alias("window_start");
    let per_page = scan()?.group_by([window("1m"), col("page")]).agg([
        len().alias("views"),
        col("user").n_unique().alias("users"),
        col("amount").mean().alias("avg_amount"),
        col("amount").max().alias("max_amount"),
    ]);
    let per_country = scan()?.group_by([col("country")]).agg([
        len().alias("n"),
        col("amount").std(1).alias("sd"),
        col("amount").min().alias("lo"),
    ]);
    let hourly = scan()?.group_by([window("1h"), col("country")]).agg([
        len().alias("n"),
        col("amount")
            .quantile(lit(0.95), QuantileMethod::Nearest)
            .alias("p95"),
    ]);
    let only = std::env::var("BATCH_BENCH_VIEWS").ok();
    let mut groups = 0;
    for (name, lf) in [
        ("per_page", per_page),
        ("per_country", per_country),
        ("hourly", hourly),
    ] {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|v| v == name))
        {
            continue;
        }
        groups += lf
            .collect_with_engine(Engine::Streaming)?
            .unwrap_single()
            .height() as u64;
    }
    Ok(groups)
}

/// The same three queries in Python polars and DuckDB, for a second opinion.
const PEERS: &str = r#"
import resource, sys, time
engine, files = sys.argv[1], sys.argv[2:]
if engine == "polars":
    import polars as pl
    t = time.time()
    ev = pl.scan_parquet(files).filter(pl.col("amount") >= 0)
    w = lambda every: pl.col("ts").dt.truncate(every).alias("window_start")
    queries = [
        ev.group_by(w("1m"), "page").agg(pl.len(), pl.col("user").approx_n_unique().alias("u"),
            pl.col("amount").mean().alias("avg"), pl.col("amount").max().alias("max")),
        ev.group_by("country").agg(pl.len(), pl.col("amount").std().alias("sd"),
            pl.col("amount").min().alias("lo")),
        ev.group_by(w("1h"), "country").agg(pl.len(),
            pl.col("amount").quantile(0.95, "nearest").alias("p95")),
    ]
    groups = sum(q.collect(engine="streaming").height for q in queries)
else:
    import duckdb
    t = time.time()
    con = duckdb.connect()
    con.execute("set enable_progress_bar = false")
    paths = ", ".join("'%s'" % f for f in files)
    con.execute(f"create view ev as select * from read_parquet([{paths}]) where amount >= 0")
    groups = 0
    for q in [
        "select time_bucket(interval 1 minute, ts), page, count(*), approx_count_distinct(\"user\"), avg(amount), max(amount) from ev group by all",
        "select country, count(*), stddev_samp(amount), min(amount) from ev group by all",
        "select time_bucket(interval 1 hour, ts), country, count(*), approx_quantile(amount, 0.95) from ev group by all",
    ]:
        groups += len(con.execute(q).fetchall())
wall = time.time() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"{wall:.3f} {ru.ru_utime + ru.ru_stime:.3f} {ru.ru_maxrss * 1024} {groups}")
"#;

/// Runs [`PEERS`] with `python` over the archive's files, once per engine, and prints them;
/// Python polars' figures when it ran.
fn peers(python: &str, dir: &Path, groups: f64) -> anyhow::Result<Option<Vec<f64>>> {
    let rt = tokio::runtime::Runtime::new()?;
    let files = rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        let (_, segments) = lambda_ctl::batch::sealed(&state, "bench").await?;
        let source = lambda_ctl::batch::scan::open(&lake, &segments, |_| {}).await?;
        state.close().await;
        match source {
            lambda_ctl::batch::scan::Source::Files(files) => anyhow::Ok(files),
            lambda_ctl::batch::scan::Source::Frames(_) => anyhow::bail!("not a file lake"),
        }
    })?;
    let mut polars = None;
    for engine in ["polars", "duckdb"] {
        let out = Command::new(python)
            .args(["-c", PEERS, engine])
            .args(&files)
            .output()?;
        if !out.status.success() {
            println!(
                "{engine:>31}: failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        // The figures are the last line (a library may have printed before).
        let f: Vec<f64> = String::from_utf8(out.stdout)?
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        let what = format!("Python {engine}");
        println!(
            "{what:>31}: wall {:.2}s, CPU {:.2}s, peak RSS {:.0} MB, {} groups{}",
            f[0],
            f[1],
            f[2] / 1e6,
            f[3],
            if f[3] == groups {
                ""
            } else {
                " (NOT the same groups)"
            }
        );
        if engine == "polars" && f[3] == groups {
            polars = Some(f);
        }
    }
    Ok(polars)
}

/// CPU seconds (user + system) and peak RSS (bytes) of this process, from /proc (Linux).
fn usage() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name `(…)`: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux platform Rust supports.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb * 1024.0)
}
