//! `cargo bench --bench nodes`: the speed layer on several machines (README, "Nodes"). A
//! pipeline of 6 partitions reads a JetStream stream whose subject names the partition
//! (`LAMBDA_TEST_NATS`; skipped without it), with the views people write — a distinct count,
//! a quantile, a standard deviation, a grouped 1-minute window. It is run by one
//! `serve --node`, then by three, each node on a "machine" of `NODES_BENCH_CPUS` CPUs (a cgroup,
//! as in the scale-out bench: root and a cpu controller needed; `just bench-nodes` sets 0.5).
//! Unset, every node shares the whole host.
//!
//! Per run: `NODES_BENCH_EVENTS` events (default 1 000 000) are published first, spread over
//! the 6 subjects; then the nodes start together and node a's answer is polled. The ingest
//! rate is taken between 20 % and 80 % of the events counted — the steady part, after the
//! nodes have shared the partitions out (the first to start takes all of them and hands the
//! extra ones over within a second or two) and before the tail. Then, with three nodes, one is
//! killed with -9 and 6 000 more events are published: the time until node a counts them all is
//! the time for the dead node's partitions to move (leases last 6 s).
//!
//! State and lake: PostgreSQL and the S3 server when `LAMBDA_TEST_POSTGRES` / `LAMBDA_TEST_S3`
//! are set, else a SQLite file and a local directory.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod common;
use common::cluster::{Backends, Machine, cpus_from_env};

const PARTITIONS: usize = 6;
const MOVED: usize = 6_000;

fn pipeline(name: &str, url: &str, stream: &str) -> String {
    format!(
        "name: {name}\nsource:\n  type: nats\n  url: {url}\n  stream: {stream}\n  subject: \"{stream}.{{partition}}\"\nschema:\n  id: string\n  ts: timestamp\n  user: string\n  page: string\n  latency: float\nevent_time: ts\nevent_id: id\npartitions: {PARTITIONS}\narchive:\n  segment_rows: 200000\n  segment_age: 10s\nviews:\n  - name: total\n    window: all\n    metrics:\n      n: count()\n      users: approx_count_distinct(user)\n      p99: approx_quantile(latency, 0.99)\n      sd: stddev(latency)\n  - name: per_page\n    group_by: [page]\n    window: 1m\n    metrics:\n      n: count()\n      users: approx_count_distinct(user)\n      avg: avg(latency)\n"
    )
}

fn event(i: usize) -> String {
    format!(
        "{{\"id\":\"e{i}\",\"ts\":{},\"user\":\"u{}\",\"page\":\"/p{}\",\"latency\":{}.{}}}",
        1_763_719_200_000i64 + (i / 100) as i64,
        (i * 7919) % 100_000,
        i % 50,
        (i * 31) % 900,
        i % 10
    )
}

/// Publishes events `range` to `stream`, event i on the subject of partition i mod 6.
async fn publish(js: &async_nats::jetstream::Context, stream: &str, range: std::ops::Range<usize>) {
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(2_000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let subject = format!("{stream}.{}", i % PARTITIONS);
            acks.push(js.publish(subject, event(i).into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// A `serve --node` process on a machine, killed on drop.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn start(machine: &Machine, root: &Path, name: &str) -> anyhow::Result<Node> {
        let log = std::fs::File::create(root.join(format!("node-{name}.log")))?;
        let mut child = machine
            .command(
                &[
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--node",
                    name,
                    "--project",
                ],
                root,
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting lambda-ctl serve --node")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("lambda-ctl serving on ") {
                        break url.to_string();
                    }
                }
                _ => bail!("node {name} exited; see {}/node-{name}.log", root.display()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Node { child, base })
    }

    fn cpu_seconds(&self) -> f64 {
        common::cpu_seconds(self.child.id()).unwrap_or(0.0)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The count of `pipeline`'s `total` view on `node`.
async fn counted(http: &reqwest::Client, node: &Node, pipeline: &str) -> u64 {
    let url = format!("{}/v1/views/{pipeline}/total", node.base);
    let v: serde_json::Value = match http.get(&url).send().await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    v["rows"][0]["n"].as_u64().unwrap_or(0)
}

/// Polls node `node` until it counts `n`; returns when it first reached each of `marks`
/// (fractions of `n`), measured from `from`.
async fn until_counted(
    http: &reqwest::Client,
    node: &Node,
    pipeline: &str,
    n: u64,
    marks: &[f64],
    from: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut reached = vec![None; marks.len()];
    loop {
        let got = counted(http, node, pipeline).await;
        if got > n {
            bail!("{pipeline}: counted {got} of {n} events");
        }
        for (i, m) in marks.iter().enumerate() {
            if reached[i].is_none() && got as f64 >= m * n as f64 {
                reached[i] = Some(from.elapsed());
            }
        }
        if got == n {
            return Ok(reached.into_iter().map(Option::unwrap_or_default).collect());
        }
        if from.elapsed() > Duration::from_secs(600) {
            bail!("{pipeline}: only {got} of {n} events counted after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one run measured, and its nodes, still running.
struct Run {
    /// Events/s between 20 % and 80 % of the events counted.
    rate: f64,
    /// Seconds from the nodes' start until every event was counted.
    total: f64,
    /// CPU seconds the nodes used.
    cpu: f64,
    nodes: Vec<Node>,
    pipeline: String,
    stream: String,
}

/// One run: `names.len()` nodes on `machines` consume `events` published beforehand to a
/// stream of their own.
async fn run(
    js: &async_nats::jetstream::Context,
    url: &str,
    root: &Path,
    machines: &[Machine],
    names: &[&str],
    events: usize,
) -> anyhow::Result<Run> {
    let name = format!("n{}", names.len());
    let stream = format!("NODESBENCH{}x{}", std::process::id(), names.len());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.*")],
        ..Default::default()
    })
    .await?;
    let _ = std::fs::remove_dir_all(root.join("pipelines"));
    std::fs::create_dir_all(root.join("pipelines"))?;
    std::fs::write(
        root.join(format!("pipelines/{name}.yaml")),
        pipeline(&name, url, &stream),
    )?;
    let published = Instant::now();
    publish(js, &stream, 0..events).await;
    eprintln!(
        "published {events} events in {:.1} s",
        published.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let nodes = names
        .iter()
        .zip(machines)
        .map(|(n, m)| Node::start(m, root, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let http = reqwest::Client::new();
    let marks = until_counted(
        &http,
        &nodes[0],
        &name,
        events as u64,
        &[0.2, 0.8, 1.0],
        started,
    )
    .await?;
    let rate = 0.6 * events as f64 / (marks[1] - marks[0]).as_secs_f64();
    let cpu: f64 = nodes.iter().map(Node::cpu_seconds).sum();
    Ok(Run {
        rate,
        total: marks[2].as_secs_f64(),
        cpu,
        nodes,
        pipeline: name,
        stream,
    })
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("nodes: bench");
        return Ok(());
    }
    let Some(url) = std::env::var("LAMBDA_TEST_NATS")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        println!("skipped: LAMBDA_TEST_NATS is not set");
        return Ok(());
    };
    let events: usize = std::env::var("NODES_BENCH_EVENTS").map_or(Ok(1_000_000), |v| {
        v.parse()
            .with_context(|| format!("NODES_BENCH_EVENTS={v}: not a count"))
    })?;
    let cpus = cpus_from_env("NODES_BENCH_CPUS")?;
    let rt = tokio::runtime::Runtime::new()?;
    let backends = rt.block_on(Backends::create())?;
    let outcome = rt.block_on(bench(&backends, &url, events, cpus));
    rt.block_on(backends.drop());
    outcome
}

async fn bench(
    backends: &Backends,
    url: &str,
    events: usize,
    cpus: Option<f64>,
) -> anyhow::Result<()> {
    let project = tempfile::tempdir()?;
    let root = project.path();
    backends.settings(root, "")?;
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let machines = ["a", "b", "c"]
        .iter()
        .map(|m| Machine::new(m, cpus))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let on = match cpus {
        Some(c) => format!("machines of {c} CPU"),
        None => "every node sharing this host (NODES_BENCH_CPUS unset)".to_string(),
    };
    println!(
        "nodes: {events} events over {PARTITIONS} partitions (JetStream), {}, {on}",
        backends.name
    );

    let one = run(&js, url, root, &machines, &["a"], events).await?;
    println!(
        "  1 node:  {:>9.0} events/s (20–80 %), all in {:.2} s, {:.1} µs CPU/event",
        one.rate,
        one.total,
        one.cpu * 1e6 / events as f64
    );
    drop(one.nodes);
    js.delete_stream(&one.stream).await?;

    let mut three = run(&js, url, root, &machines, &["a", "b", "c"], events).await?;
    println!(
        "  3 nodes: {:>9.0} events/s (20–80 %), all in {:.2} s, {:.1} µs CPU/event: {:.2}x one node",
        three.rate,
        three.total,
        three.cpu * 1e6 / events as f64,
        three.rate / one.rate
    );

    // Node c dies; its partitions move to a and b.
    three.nodes[2].kill9();
    let killed = Instant::now();
    publish(&js, &three.stream, events..events + MOVED).await;
    let http = reqwest::Client::new();
    let moved = until_counted(
        &http,
        &three.nodes[0],
        &three.pipeline,
        (events + MOVED) as u64,
        &[1.0],
        killed,
    )
    .await?;
    println!(
        "  kill -9 of node c → node a counts the {MOVED} events published after it in {:.2} s",
        moved[0].as_secs_f64()
    );
    drop(three.nodes);
    js.delete_stream(&three.stream).await?;
    Ok(())
}
