//! What the speed layer's tests share: a project with its state DB, lake and log, runtimes
//! started on it, and what they hold.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use polars::prelude::*;
use tokio_util::sync::CancellationToken;

use super::runtime::PipelineRuntime;
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Pipeline;
use crate::state::State;

pub(super) fn spec(format: &str, segment_age: &str) -> String {
    format!(
        r#"
name: orders
source:
  type: http
format: {format}
schema:
  ts: timestamp
  country: string
  amount: float
event_time: ts
archive:
  segment_rows: 1000000
  segment_age: {segment_age}
{VIEWS}"#
    )
}

/// The views of the test specs: `overall`, the count and total amount of every event.
const VIEWS: &str = "views:
  - name: overall
    window: all
    metrics:
      n: count()
      total: sum(amount)
";

/// An http pipeline `orders` with an `id` column, in `partitions` partitions, with `key`
/// (a line such as `event_id: id`, or none) and `segment_age`.
pub(super) fn partitioned_spec(partitions: u32, key: &str, segment_age: &str) -> String {
    format!(
        r#"
name: orders
source: {{type: http}}
schema:
  id: string
  ts: timestamp
  country: string
  amount: float
event_time: ts
{key}
partitions: {partitions}
archive: {{segment_age: {segment_age}}}
{VIEWS}"#
    )
}

/// A project directory with its state DB, lake and log, and runtimes started on them.
pub(super) struct Project {
    pub dir: tempfile::TempDir,
    pub pipeline: Arc<Pipeline>,
    pub plan: Arc<Plan>,
    pub db: State,
    pub lake: Lake,
    pub shutdown: CancellationToken,
}

impl Project {
    pub async fn new(spec: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(dir.path().join("pipelines/orders.yaml"), spec).unwrap();
        let project = crate::spec::load(dir.path()).expect("valid spec");
        let pipeline = Arc::new(project.pipeline("orders").unwrap().clone());
        let plan = Arc::new(Plan::compile(&pipeline).unwrap());
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let db = State::open(&url).await.unwrap();
        let lake_dir = dir.path().join("lake");
        let lake = Lake::open(&format!("file://{}", lake_dir.display()), &BTreeMap::new()).unwrap();
        Project {
            dir,
            pipeline,
            plan,
            db,
            lake,
            shutdown: CancellationToken::new(),
        }
    }

    pub async fn start(&mut self) -> Arc<PipelineRuntime> {
        self.try_start().await.unwrap()
    }

    /// A runtime as a `serve` without --node, after stopping every one started before.
    pub async fn try_start(&mut self) -> anyhow::Result<Arc<PipelineRuntime>> {
        self.shutdown.cancel();
        self.shutdown = CancellationToken::new();
        PipelineRuntime::start(
            self.pipeline.clone(),
            self.plan.clone(),
            self.db.clone(),
            self.lake.clone(),
            BTreeMap::new(),
            &self.dir.path().join("log"),
            self.shutdown.clone(),
        )
        .await
    }
}

impl Project {
    /// A runtime as node `node` (`serve --node`) with its own log directory, beside any other
    /// started; it stops when `stop` is cancelled (or the project's runtimes stop).
    pub async fn start_node(&self, node: &str) -> (Arc<PipelineRuntime>, CancellationToken) {
        let stop = self.shutdown.child_token();
        let rt = PipelineRuntime::start_on(
            Some(node.to_string()),
            self.pipeline.clone(),
            self.plan.clone(),
            self.db.clone(),
            self.lake.clone(),
            BTreeMap::new(),
            &self.dir.path().join("nodes").join(node).join("log"),
            stop.clone(),
        )
        .await
        .unwrap();
        (rt, stop)
    }
}

/// `(n, total)` of the `overall` view as the speed layer holds it (these tests publish
/// no batch view): its partials merged and finished by the plan.
pub(super) fn served(rt: &PipelineRuntime) -> (u64, f64) {
    let snap = rt.snapshot(0);
    if snap.speed.is_empty() {
        return (0, 0.0);
    }
    let merged = snap.plan.merge(0, snap.speed.clone()).unwrap();
    let answer = snap.plan.finish(0, merged).unwrap();
    let n = answer.column("n").unwrap().cast(&DataType::UInt64).unwrap();
    let total = answer
        .column("total")
        .unwrap()
        .cast(&DataType::Float64)
        .unwrap();
    (
        n.u64().unwrap().get(0).unwrap_or(0),
        total.f64().unwrap().get(0).unwrap_or(0.0),
    )
}

pub(super) async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < Duration::from_secs(15), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events `ids` (`id` "e{i}", amount = i) as one NDJSON request, for specs with an `id` column.
pub(super) fn events(ids: std::ops::Range<u32>) -> Bytes {
    let lines: Vec<String> = ids
        .map(|i| {
            format!(r#"{{"id": "e{i}", "ts": 1700000000000, "country": "DE", "amount": {i}}}"#)
        })
        .collect();
    Bytes::from(lines.join("\n"))
}

/// The total amount of [`events`]`(ids)`.
pub(super) fn total(ids: std::ops::Range<u32>) -> f64 {
    ids.map(f64::from).sum()
}

pub(super) fn ndjson(amounts: &[f64]) -> Bytes {
    let lines: Vec<String> = amounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                r#"{{"ts": {}, "country": "DE", "amount": {a}}}"#,
                1_700_000_000_000 + i as i64
            )
        })
        .collect();
    Bytes::from(lines.join("\n"))
}
