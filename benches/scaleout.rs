//! `cargo bench --bench scaleout`: one batch run of the same archive computed by one process,
//! then scaled out (DESIGN.md §4) over 3 `lambda-ctl worker` processes; prints the wall time of
//! each `lambda-ctl run PIPELINE --wait` and checks both published the same answers.
//!
//! Every process lives on a "machine": with `SCALEOUT_BENCH_CPUS=C` each machine is a cgroup
//! with a quota of C CPUs (root and a cgroup v1 or v2 cpu controller needed), so a small host
//! stands in for several hosts of C CPUs each. The one-process run gets machine A; in the
//! scaled-out run the run's process and worker 1 share machine A, workers 2 and 3 have B and C.
//! Without it, every process shares the whole host.
//!
//! `SCALEOUT_BENCH_EVENTS` (default 4 000 000), `SCALEOUT_BENCH_SEGMENT_ROWS` (100 000),
//! `SCALEOUT_BENCH_GROUP` (segments per group job; default a third of them, one group per
//! worker) and `SCALEOUT_BENCH_REPEAT` (3; the median is reported) size it. State and lake are a SQLite file and a local directory, or
//! PostgreSQL and the S3 server of `LAMBDA_TEST_POSTGRES` / `LAMBDA_TEST_S3` when set.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lambda_ctl::lake::Lake;
use lambda_ctl::plan::Plan;
use lambda_ctl::state::State;
use polars::prelude::{DataFrame, DataType};

mod common;
use common::archive::{SPEC, archive};
use common::cluster::{Backends, Machine, cpus_from_env};

const VIEWS: [&str; 3] = ["per_minute", "per_country", "per_user"];

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("scaleout: bench");
        return Ok(());
    }
    let env = |name: &str, default: usize| -> anyhow::Result<usize> {
        std::env::var(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("{name}={v}: not a count"))
        })
    };
    let events = env("SCALEOUT_BENCH_EVENTS", 4_000_000)?;
    let segment_rows = env("SCALEOUT_BENCH_SEGMENT_ROWS", 100_000)?.max(1);
    // One group per worker by default: every worker reads its share of the archive once, and
    // the finish job merges three partials per view.
    let group = env(
        "SCALEOUT_BENCH_GROUP",
        events.div_ceil(segment_rows).div_ceil(3),
    )?
    .max(1);
    let repeat = env("SCALEOUT_BENCH_REPEAT", 3)?.max(1);
    let cpus = cpus_from_env("SCALEOUT_BENCH_CPUS")?;
    let rt = tokio::runtime::Runtime::new()?;
    let backends = rt.block_on(Backends::create())?;
    let outcome = bench(&rt, &backends, events, segment_rows, group, repeat, cpus);
    rt.block_on(backends.drop());
    outcome
}

fn bench(
    rt: &tokio::runtime::Runtime,
    backends: &Backends,
    events: usize,
    segment_rows: usize,
    group: usize,
    repeat: usize,
    cpus: Option<f64>,
) -> anyhow::Result<()> {
    let project = tempfile::tempdir()?;
    let root = project.path();
    std::fs::create_dir_all(root.join("pipelines"))?;
    // A pipeline per run: every run is a full recompute over the same archive.
    let pipelines: Vec<(String, String)> = (1..=repeat)
        .map(|i| (format!("single{i}"), format!("scaled{i}")))
        .collect();
    let names: Vec<String> = pipelines
        .iter()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    for name in &names {
        std::fs::write(
            root.join(format!("pipelines/{name}.yaml")),
            SPEC.replace("name: bench", &format!("name: {name}")),
        )?;
    }
    let started = Instant::now();
    let segments = rt.block_on(async {
        let state = State::open(&backends.state).await?;
        let lake = Lake::open(&backends.lake, &backends.lake_options)?;
        let segments = archive(&lake, &state, &names, (events, segment_rows), false).await?;
        state.close().await;
        anyhow::Ok(segments)
    })?;
    eprintln!(
        "archived {events} events in {segments} segments for {} pipelines in {:.1}s",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    let settings = |scale_out: usize| {
        backends.settings(
            root,
            &format!("batch:\n  scale_out_segments: {scale_out}\n  group_segments: {group}\n"),
        )
    };

    let machines = ["a", "b", "c"]
        .iter()
        .map(|m| Machine::new(m, cpus))
        .collect::<anyhow::Result<Vec<_>>>()?;
    settings(0)?;
    let mut workers = Vec::new();
    for (i, machine) in machines.iter().enumerate() {
        workers.push(Worker::start(machine, root, i + 1)?);
    }
    let (mut single, mut scaled) = (Vec::new(), Vec::new());
    for (one, many) in &pipelines {
        settings(0)?;
        single.push(run(&machines[0], root, one)?);
        settings(1)?;
        let before: Vec<usize> = workers.iter().map(Worker::groups).collect();
        scaled.push(run(&machines[0], root, many)?);
        let busy = workers
            .iter()
            .zip(before)
            .filter(|(w, before)| w.groups() > *before)
            .count();
        ensure!(
            busy >= 2,
            "{many}: only {busy} worker(s) computed groups; logs in {}",
            root.display()
        );
        rt.block_on(same_views(backends, root, one, many))?;
    }
    drop(workers);

    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (one, many) = (median(&mut single), median(&mut scaled));
    let on = match cpus {
        Some(c) => format!("machines of {c} CPU"),
        None => "all processes sharing this host (SCALEOUT_BENCH_CPUS unset)".to_string(),
    };
    println!(
        "scaleout: {events} events, {segments} segments, groups of {group}, {}, {on}",
        backends.name
    );
    println!(
        "  one process {one:.2}s, 3 workers {many:.2}s (median of {repeat}): {:.2}x",
        one / many
    );
    Ok(())
}

/// `lambda-ctl run PIPELINE --wait` on `machine`; how long it took.
fn run(machine: &Machine, root: &Path, pipeline: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = machine
        .command(&["run", pipeline, "--wait", "--project"], root)
        .env("RUST_LOG", "warn")
        .output()?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "lambda-ctl run {pipeline}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// Both runs published every view, with the same answer (floats up to merge-order rounding).
async fn same_views(backends: &Backends, root: &Path, one: &str, many: &str) -> anyhow::Result<()> {
    let project = lambda_ctl::spec::load(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = State::open(&backends.state).await?;
    let lake = Lake::open(&backends.lake, &backends.lake_options)?;
    for (v, view) in VIEWS.iter().enumerate() {
        let mut answers = Vec::new();
        for pipeline in [one, many] {
            let spec = project.pipeline(pipeline).context("pipeline")?;
            let plan = std::sync::Arc::new(Plan::compile(spec)?);
            let publication = state
                .current_publication(pipeline, view)
                .await?
                .with_context(|| format!("{pipeline}.{view} was not published"))?;
            let partials = lambda_ctl::batch::load_partials(&plan, &lake, v, &publication).await?;
            answers.push(plan.finish(v, partials)?);
        }
        same_frame(&answers[0], &answers[1])
            .with_context(|| format!("{view}: the one-process and 3-worker answers differ"))?;
    }
    state.close().await;
    Ok(())
}

/// Equal frames, floats within a relative 1e-9.
fn same_frame(a: &DataFrame, b: &DataFrame) -> anyhow::Result<()> {
    ensure!(
        a.shape() == b.shape(),
        "shapes {:?} and {:?}",
        a.shape(),
        b.shape()
    );
    for (x, y) in a.columns().iter().zip(b.columns()) {
        let (x, y) = (x.as_materialized_series(), y.as_materialized_series());
        if x.dtype().is_float() {
            let (x, y) = (x.cast(&DataType::Float64)?, y.cast(&DataType::Float64)?);
            for (p, q) in x.f64()?.iter().zip(y.f64()?.iter()) {
                let close = match (p, q) {
                    (Some(p), Some(q)) => (p - q).abs() <= 1e-9 * p.abs().max(q.abs()).max(1.0),
                    (p, q) => p.is_none() && q.is_none(),
                };
                ensure!(close, "column {}: {p:?} vs {q:?}", x.name());
            }
        } else {
            ensure!(x.equals_missing(y), "column {} differs", x.name());
        }
    }
    Ok(())
}

/// A `lambda-ctl worker` process, killed on drop; its log goes to `worker-N.log`.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(machine: &Machine, root: &Path, n: usize) -> anyhow::Result<Worker> {
        let log = root.join(format!("worker-{n}.log"));
        let mut child = machine
            .command(&["worker", "--concurrency", "1", "--project"], root)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting lambda-ctl worker")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("lambda-ctl worker started") => break,
                Some(Ok(_)) => {}
                _ => bail!("worker {n} exited: {}", std::fs::read_to_string(&log)?),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Worker { child, log })
    }

    /// How many groups it has computed.
    fn groups(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |l| l.matches("computed batch group").count())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
