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

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lambda_ctl::lake::Lake;
use lambda_ctl::plan::Plan;
use lambda_ctl::state::State;
use polars::prelude::{DataFrame, DataType};

mod common;
use common::archive::{SPEC, archive};

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
    let cpus = match std::env::var("SCALEOUT_BENCH_CPUS") {
        Ok(v) => Some(
            v.parse::<f64>()
                .ok()
                .filter(|c| *c > 0.0)
                .with_context(|| format!("SCALEOUT_BENCH_CPUS={v}: not a positive number"))?,
        ),
        Err(_) => None,
    };
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
        let segments = archive(&lake, &state, &names, events, segment_rows).await?;
        state.close().await;
        anyhow::Ok(segments)
    })?;
    eprintln!(
        "archived {events} events in {segments} segments for {} pipelines in {:.1}s",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    let settings = |scale_out: usize| backends.settings(root, scale_out, group);

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
            let plan = Plan::compile(spec)?;
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

/// Where the state DB and the lake live.
struct Backends {
    name: String,
    state: String,
    lake: String,
    lake_options: BTreeMap<String, String>,
    /// A database created on `LAMBDA_TEST_POSTGRES`: (server URL, database name).
    database: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Backends {
    async fn create() -> anyhow::Result<Backends> {
        let dir = tempfile::tempdir()?;
        let tag = format!("lambda_bench_{}", std::process::id());
        let (state, database) = match std::env::var("LAMBDA_TEST_POSTGRES") {
            Ok(server) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&server)
                    .await
                    .with_context(|| format!("LAMBDA_TEST_POSTGRES={server}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {tag}")))
                    .execute(&mut conn)
                    .await?;
                let mut url = url::Url::parse(&server)?;
                url.set_path(&tag);
                (url.to_string(), Some((server, tag.clone())))
            }
            Err(_) => (
                format!("sqlite://{}", dir.path().join("state.db").display()),
                None,
            ),
        };
        let (lake, lake_options) = match std::env::var("LAMBDA_TEST_S3") {
            Ok(endpoint) => {
                let endpoint = endpoint.trim_end_matches('/').to_string();
                let bucket = tag.replace('_', "-");
                let resp = reqwest::Client::new()
                    .put(format!("{endpoint}/{bucket}"))
                    .send()
                    .await
                    .with_context(|| format!("LAMBDA_TEST_S3={endpoint}"))?;
                ensure!(
                    resp.status().is_success(),
                    "creating bucket {bucket}: {}",
                    resp.status()
                );
                let options = [
                    ("endpoint", endpoint.as_str()),
                    ("region", "us-east-1"),
                    ("allow_http", "true"),
                    ("access_key_id", "test"),
                    ("secret_access_key", "test"),
                ];
                (
                    format!("s3://{bucket}/lake"),
                    options
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            }
            Err(_) => (
                format!("file://{}", dir.path().join("lake").display()),
                BTreeMap::new(),
            ),
        };
        let name = format!(
            "{} state, {} lake",
            if database.is_some() {
                "PostgreSQL"
            } else {
                "SQLite"
            },
            if lake_options.is_empty() {
                "local"
            } else {
                "S3"
            }
        );
        Ok(Backends {
            name,
            state,
            lake,
            lake_options,
            database,
            _dir: dir,
        })
    }

    /// Writes the project's lambda.yaml: these backends and the `batch:` settings.
    fn settings(&self, root: &Path, scale_out: usize, group: usize) -> anyhow::Result<()> {
        let mut yaml = format!("state: {}\nlake: {}\n", self.state, self.lake);
        if !self.lake_options.is_empty() {
            yaml.push_str("lake_options:\n");
            for (k, v) in &self.lake_options {
                yaml.push_str(&format!("  {k}: \"{v}\"\n"));
            }
        }
        yaml.push_str(&format!(
            "batch:\n  scale_out_segments: {scale_out}\n  group_segments: {group}\n"
        ));
        Ok(std::fs::write(root.join("lambda.yaml"), yaml)?)
    }

    async fn drop(self) {
        if let Some((server, name)) = &self.database {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(server).await {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

/// A process group with a CPU quota (a cgroup), or the whole host.
struct Machine {
    /// The cgroup's directory, when confined.
    cgroup: Option<PathBuf>,
}

impl Machine {
    fn new(name: &str, cpus: Option<f64>) -> anyhow::Result<Machine> {
        let Some(cpus) = cpus else {
            return Ok(Machine { cgroup: None });
        };
        let name = format!("lambda-bench-{}-{name}", std::process::id());
        let period = 100_000u64;
        let quota = (cpus * period as f64).round() as u64;
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let made = if v2 {
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            // The cpu controller must be on for the root's children (it usually is).
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
            std::fs::create_dir(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")))
                .map(|()| dir)
        } else {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(&name);
            std::fs::create_dir(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()))
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()))
                .map(|()| dir)
        };
        match made {
            Ok(dir) => Ok(Machine { cgroup: Some(dir) }),
            Err(e) => bail!(
                "SCALEOUT_BENCH_CPUS needs a writable cgroup cpu controller (root): {e}; \
                 unset it to run every process on the whole host"
            ),
        }
    }

    /// `lambda-ctl ARGS… ROOT` started inside this machine.
    fn command(&self, args: &[&str], root: &Path) -> Command {
        let exe = env!("CARGO_BIN_EXE_lambda-ctl");
        let mut command = match &self.cgroup {
            // The shell joins the cgroup, then becomes lambda-ctl: every thread starts inside.
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(dir.join("cgroup.procs"))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        command.args(args).arg(root);
        command
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
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
