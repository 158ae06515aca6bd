//! `cargo bench --bench batch`: a batch recompute of archived events (3 views) beside a plain
//! polars streaming query of the same aggregations over the same Parquet files. Each side runs
//! in a fresh child process so wall time, CPU seconds and peak RSS are its own.
//!
//! `BATCH_BENCH_EVENTS` (default 10 000 000) sets the size; segments hold 500 000 events.

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
use common::archive::{SPEC, archive};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // Child modes: `batch DIR` and `polars DIR`.
    if let Some(pos) = args.iter().position(|a| a == "batch" || a == "polars") {
        let dir = PathBuf::from(&args[pos + 1]);
        let start = Instant::now();
        let groups = if args[pos] == "batch" {
            batch(&dir)?
        } else {
            plain(&dir)?
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
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    prepare(dir.path(), events)?;
    eprintln!(
        "archived {events} events in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe()?;
    let mut figures = Vec::new();
    for mode in ["polars", "batch"] {
        let out = Command::new(&exe).arg(mode).arg(dir.path()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout)?;
        let f: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        println!(
            "{mode:>6}: {events} events, 3 views: wall {:.2}s, CPU {:.2}s, peak RSS {:.0} MB, {} groups",
            f[0],
            f[1],
            f[2] / 1e6,
            f[3]
        );
        figures.push(f);
    }
    // Same groups on both sides, or the comparison is meaningless.
    anyhow::ensure!(
        figures[0][3] == figures[1][3],
        "plain polars found {} groups, the batch layer {}",
        figures[0][3],
        figures[1][3]
    );
    println!(
        " ratio: wall {:.2}x, CPU {:.2}x (batch / plain polars)",
        figures[1][0] / figures[0][0],
        figures[1][1] / figures[0][1]
    );
    Ok(())
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
        archive(&lake, &state, &["bench".to_string()], events, SEGMENT_ROWS).await?;
        state.close().await;
        anyhow::Ok(())
    })
}

/// The batch layer: `recompute` with its publish and Parquet output.
fn batch(dir: &Path) -> anyhow::Result<u64> {
    let plan = Arc::new(plan()?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let state = State::open(&state_url(dir)).await?;
        let lake = Lake::open(&lake_url(dir), &BTreeMap::new())?;
        let summary =
            lambda_ctl::batch::recompute(plan, &state, &lake, Default::default(), &mut |_| {})
                .await?;
        state.close().await;
        Ok(summary.views.iter().map(|v| v.publication.rows).sum())
    })
}

/// Plain polars: the same filter and group-bys, streaming, over the same segments as the batch
/// layer scans them (`batch::scan`).
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
    let per_minute = scan()?
        .group_by([
            col("ts").dt().truncate(lit("1m")).alias("window_start"),
            col("country"),
        ])
        .agg([len().alias("n"), col("amount").sum().alias("total")]);
    let per_country = scan()?.group_by([col("country")]).agg([
        len().alias("n"),
        col("amount").min().alias("lo"),
        col("amount").max().alias("hi"),
    ]);
    let per_user = scan()?.group_by([col("user")]).agg([
        len().alias("n"),
        col("amount").sum().alias("sum"),
        col("amount").count().alias("count"),
    ]);
    let mut groups = 0;
    for lf in [per_minute, per_country, per_user] {
        groups += lf.with_streaming(true).collect()?.height() as u64;
    }
    Ok(groups)
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
