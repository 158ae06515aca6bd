//! Sinks (DESIGN.md §8): every `sinks:` entry of a view is a task that keeps a destination — a
//! PostgreSQL table ([`postgres`]), a Kafka topic ([`kafka`]), a file ([`files`]) — equal to
//! the view's **served answer**, the same finished rows `GET /v1/views/…` returns.
//!
//! A sink is a view of the answer, not of events: whenever the pipeline's state changed
//! ([`PipelineRuntime::version`](crate::speed::runtime::PipelineRuntime::version); at most
//! once per `every`) the runner takes the finished answer ([`Served::answer`]: the one
//! queries share, computed without making a query wait), compares it with what the
//! destination holds, keyed by (window_start, group keys) ([`rows::diff`]), and hands the
//! target only the rows that are new or changed and the keys of rows that vanished (two
//! sessions merged; windows retired by `retention`). A batch publication that restates old
//! windows thus updates exactly those rows.
//!
//! Exactly once, by convergence: what a destination holds is read back when the sink starts
//! ([`Target::open`]), and every delivery brings it from what it holds to the answer — values,
//! not increments — so a replay after a crash writes nothing twice and skips nothing. A target
//! records the answer's [`AsOf`] with the rows in one atomic step where it can (one PostgreSQL
//! transaction with its progress row; the Parquet file's metadata; each Kafka record's value).
//! A failed delivery changes nothing the runner believes: the target is opened (and read back)
//! again and the next attempt computes the difference anew.
//!
//! A destination that is down never blocks ingest or queries: deliveries are retried with
//! exponential backoff, and each sink's lag ([`SinkStatus`]) shows in `/metrics`
//! (`lambda_sink_lag_seconds`), `/v1/pipelines` and `lambda-ctl status`.

pub mod files;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod postgres;
pub mod rows;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::query::{AsOf, Served};
use crate::clock::{format_ms, now_ms};
use crate::lake::Lake;
use crate::spec::{Emit, Sink, SinkTarget};
use rows::{Diff, Rows, Shape};

/// How often a runner looks at the pipeline's version (cheap: one read lock).
const POLL: Duration = Duration::from_millis(20);
/// How long `serve` waits at startup for a destination to answer before it starts without it
/// (the sink keeps retrying in the background).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delays after a failed delivery: from 500 ms, doubling up to a minute, with jitter.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(500))
    .with_max_delay(Duration::from_secs(60))
    .with_jitter()
    .without_max_times();

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The destination exists but cannot take this view (a column of another type, no key):
    /// `serve` refuses to start when it sees this at startup.
    #[error("{0}")]
    Config(String),
    /// Unreachable, refused, timed out: retried.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// What a destination holds when (re)opened.
pub enum Holding {
    /// These rows (read back).
    Rows(Rows),
    /// What this process last delivered, unchanged since (no need to read it back).
    Same,
    /// Not known: the next delivery writes the whole answer.
    Unknown,
}

/// One delivery: the changes, the rows the destination holds after them, and where the
/// numbers come from.
pub struct Delivery<'a> {
    pub diff: &'a Diff,
    pub rows: &'a Rows,
    pub as_of: &'a AsOf,
}

/// A destination kind.
#[async_trait]
pub trait Target: Send {
    /// Connects, checks (or creates) the destination, and says what it holds.
    async fn open(&mut self) -> Result<Holding, SinkError>;

    /// Brings the destination to `delivery.rows` by applying `delivery.diff`, with the
    /// progress (`as_of`) where the target keeps it. On error nothing is assumed applied:
    /// the runner opens the target again before the next attempt.
    async fn apply(&mut self, delivery: &Delivery<'_>) -> Result<(), SinkError>;

    /// Whether a delivery without changed rows is worth making to record a new batch
    /// publication in the progress (a PostgreSQL progress row: yes; a whole file: no).
    fn records_progress_alone(&self) -> bool {
        false
    }
}

/// What a sink needs from the project besides its view.
#[derive(Clone)]
pub struct Context {
    /// The project's lake (lake-relative `files` paths).
    pub lake: Lake,
    /// Its URL and options: a `files` URL on the same kind of store uses the same options.
    pub lake_url: String,
    pub lake_options: BTreeMap<String, String>,
}

/// Live figures of one sink, for `/metrics`, `/v1/pipelines` and `status`.
pub struct SinkStatus {
    pub pipeline: String,
    pub view: String,
    /// [`SinkTarget::name`]: `postgres:TABLE`, `kafka:TOPIC`, `files:PATH`.
    pub name: String,
    pub kind: &'static str,
    pub upserted: AtomicU64,
    pub deleted: AtomicU64,
    pub deliveries: AtomicU64,
    pub failures: AtomicU64,
    progress: Mutex<Progress>,
}

/// The part of a [`SinkStatus`] that changes together.
struct Progress {
    /// Since when the served answer has had a change the destination does not reflect yet
    /// (`None`: up to date). The lag is its age.
    behind_since: Option<Instant>,
    /// The last failure, cleared by the next successful delivery.
    error: Option<String>,
    last_delivery_ms: Option<i64>,
    /// Rows the destination holds.
    rows: usize,
    /// `starting` (not opened yet), `ok`, `retrying`.
    state: &'static str,
}

impl SinkStatus {
    fn new(pipeline: &str, view: &str, sink: &Sink) -> SinkStatus {
        SinkStatus {
            pipeline: pipeline.to_string(),
            view: view.to_string(),
            name: sink.target.name(),
            kind: sink.target.kind(),
            upserted: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            progress: Mutex::new(Progress {
                // Nothing is delivered yet: behind since the start.
                behind_since: Some(Instant::now()),
                error: None,
                last_delivery_ms: None,
                rows: 0,
                state: "starting",
            }),
        }
    }

    /// Seconds the destination is behind the served answer (0 when up to date).
    pub fn lag_seconds(&self) -> f64 {
        self.progress
            .lock()
            .behind_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// 1 when the last attempt succeeded.
    pub fn up(&self) -> bool {
        self.progress.lock().state == "ok"
    }

    pub fn json(&self) -> Value {
        let p = self.progress.lock();
        json!({
            "view": self.view,
            "sink": self.name,
            "type": self.kind,
            "state": p.state,
            "lag_s": p.behind_since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            "rows": p.rows,
            "upserted": self.upserted.load(Ordering::Relaxed),
            "deleted": self.deleted.load(Ordering::Relaxed),
            "last_delivery": p.last_delivery_ms.map(format_ms),
            "error": p.error,
        })
    }

    fn changed(&self, at: Instant) {
        let mut p = self.progress.lock();
        p.behind_since.get_or_insert(at);
    }

    /// A delivery (or a check that found nothing to deliver) succeeded; the destination
    /// reflects every change before `behind_since` (`None`: all of them).
    fn delivered(&self, rows: usize, diff: Option<&Diff>, behind_since: Option<Instant>) {
        if let Some(d) = diff {
            self.upserted
                .fetch_add(d.upserts.len() as u64, Ordering::Relaxed);
            self.deleted
                .fetch_add(d.deletes.len() as u64, Ordering::Relaxed);
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        let mut p = self.progress.lock();
        p.behind_since = behind_since;
        p.error = None;
        p.rows = rows;
        p.state = "ok";
        if diff.is_some() {
            p.last_delivery_ms = Some(now_ms());
        }
    }

    fn failed(&self, error: &SinkError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut p = self.progress.lock();
        p.error = Some(error.to_string());
        p.state = "retrying";
    }
}

/// The sinks `serve` runs: their figures, and their tasks (ended by the shutdown token).
#[derive(Default)]
pub struct Sinks {
    pub statuses: Vec<Arc<SinkStatus>>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Builds and opens every sink of every served pipeline, then starts their tasks. A
/// destination that is unreachable now is retried in the background; one that cannot take
/// its view (an incompatible table) is an error naming the pipeline, view and sink.
pub async fn start_all(
    pipelines: &BTreeMap<String, Arc<Served>>,
    ctx: &Context,
    shutdown: &CancellationToken,
) -> Result<Sinks, String> {
    let mut out = Sinks::default();
    for served in pipelines.values() {
        let pipeline = served.runtime.pipeline.clone();
        for (view_idx, view) in pipeline.views.iter().enumerate() {
            for sink in &view.sinks {
                let whose = format!(
                    "pipeline `{}`, view `{}`, sink `{}`",
                    pipeline.name,
                    view.name,
                    sink.target.name()
                );
                let mut runner = Runner::new(served.clone(), view_idx, sink, ctx)
                    .map_err(|e| format!("{whose}: {e}"))?;
                match tokio::time::timeout(STARTUP_TIMEOUT, runner.open()).await {
                    Ok(Err(SinkError::Config(e))) => return Err(format!("{whose}: {e}")),
                    Ok(Err(e)) => tracing::warn!(
                        pipeline = %pipeline.name, view = %view.name, sink = %runner.status.name,
                        error = %e, "sink destination unavailable at startup; retrying in the background"
                    ),
                    Err(_) => tracing::warn!(
                        pipeline = %pipeline.name, view = %view.name, sink = %runner.status.name,
                        timeout_s = STARTUP_TIMEOUT.as_secs(),
                        "sink destination did not answer at startup; retrying in the background"
                    ),
                    Ok(Ok(())) => {}
                }
                out.statuses.push(runner.status.clone());
                out.tasks.push(tokio::spawn(runner.run(shutdown.clone())));
            }
        }
    }
    Ok(out)
}

/// The target of `sink`, without contacting it.
fn target(
    sink: &Sink,
    shape: &Shape,
    pipeline: &str,
    view: &str,
    ctx: &Context,
) -> Result<Box<dyn Target>, SinkError> {
    Ok(match &sink.target {
        SinkTarget::Postgres { url, table } => Box::new(postgres::PostgresTarget::new(
            url,
            table,
            &format!("{pipeline}.{view}"),
            shape.clone(),
        )),
        SinkTarget::Files {
            path,
            format,
            options,
        } => Box::new(files::FilesTarget::new(
            path,
            *format,
            options,
            &format!("{pipeline}.{view}"),
            shape.clone(),
            ctx,
        )?),
        #[cfg(feature = "kafka")]
        SinkTarget::Kafka {
            brokers,
            topic,
            security,
            properties,
        } => Box::new(kafka::KafkaTarget::new(
            brokers,
            topic,
            security,
            properties,
            &format!("{pipeline}.{view}"),
            shape.clone(),
        )),
        #[cfg(not(feature = "kafka"))]
        SinkTarget::Kafka { .. } => {
            return Err(SinkError::Config(
                "the `kafka` sink is not available in this build of lambda-ctl (built without the `kafka` cargo feature)".into(),
            ));
        }
    })
}

/// One sink: its view, its target, and what the target holds.
pub struct Runner {
    served: Arc<Served>,
    view_idx: usize,
    sink: Sink,
    shape: Arc<Shape>,
    target: Box<dyn Target>,
    /// What the destination holds, as far as this process knows; `None` before the first
    /// successful open.
    held: Option<Rows>,
    /// The target is open and `held` is what it holds; cleared by a failure.
    open: bool,
    /// The next delivery writes even when nothing changed (the destination's content is
    /// unknown: a file sink after a start).
    force: bool,
    /// The batch run of the last delivery's answer (`None`: none delivered by this process),
    /// so a publication that changed no row still reaches a progress record.
    delivered_run: Option<Option<String>>,
    status: Arc<SinkStatus>,
}

impl Runner {
    pub fn new(
        served: Arc<Served>,
        view_idx: usize,
        sink: &Sink,
        ctx: &Context,
    ) -> Result<Runner, SinkError> {
        let rt = &served.runtime;
        let view = &rt.pipeline.views[view_idx];
        let shape = Shape::new(view, &rt.plan().output_schema(view_idx));
        let target = target(sink, &shape, &rt.pipeline.name, &view.name, ctx)?;
        let status = Arc::new(SinkStatus::new(&rt.pipeline.name, &view.name, sink));
        Ok(Runner {
            view_idx,
            sink: sink.clone(),
            shape: Arc::new(shape),
            target,
            held: None,
            open: false,
            force: false,
            delivered_run: None,
            status,
            served,
        })
    }

    pub fn status(&self) -> Arc<SinkStatus> {
        self.status.clone()
    }

    /// Opens the target and learns what it holds.
    pub async fn open(&mut self) -> Result<(), SinkError> {
        match self.target.open().await? {
            Holding::Rows(rows) => self.held = Some(rows),
            Holding::Same if self.held.is_some() => {}
            Holding::Same | Holding::Unknown => {
                self.held = Some(Rows::new());
                self.force = true;
            }
        }
        self.open = true;
        let held = self.held.as_ref().map_or(0, Rows::len);
        tracing::info!(
            pipeline = %self.status.pipeline, view = %self.status.view, sink = %self.status.name,
            rows = held, "sink destination open"
        );
        Ok(())
    }

    /// Delivers until `shutdown`; a delivery under way is finished first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let rt = self.served.runtime.clone();
        if !caught_up(&self.served, &shutdown).await {
            return;
        }
        let mut backoff = BACKOFF.build();
        let mut next_at = Instant::now();
        let mut seen = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let version = rt.version();
            if seen != Some(version) {
                seen = Some(version);
                self.status.changed(Instant::now());
            }
            // `emit: final` also looks when nothing changed: windows become final by time.
            let wanted = self.status.progress.lock().behind_since.is_some()
                || self.sink.emit == Emit::Final
                || self.force
                || !self.open;
            if !wanted || Instant::now() < next_at {
                continue;
            }
            match self.attempt().await {
                Ok(()) => {
                    backoff = BACKOFF.build();
                    next_at = Instant::now() + self.sink.every;
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(60));
                    tracing::warn!(
                        pipeline = %self.status.pipeline, view = %self.status.view, sink = %self.status.name,
                        error = %e, retry_in_ms = delay.as_millis() as u64, "sink delivery failed; retrying"
                    );
                    self.status.failed(&e);
                    self.open = false;
                    next_at = Instant::now() + delay;
                }
            }
        }
    }

    /// One delivery: open the target if needed, compute the answer and its difference from
    /// what the destination holds, apply it.
    async fn attempt(&mut self) -> Result<(), SinkError> {
        if !self.open {
            self.open().await?;
        }
        let rt = self.served.runtime.clone();
        let started = Instant::now();
        let version = rt.version();
        let held = self.held.take().unwrap_or_default();
        let (served, shape) = (self.served.clone(), self.shape.clone());
        let (view_idx, emit) = (self.view_idx, self.sink.emit);
        let lateness = i64::try_from(self.sink.allowed_lateness.as_millis()).unwrap_or(i64::MAX);
        let computed = tokio::task::spawn_blocking(move || {
            let answer = served
                .answer(view_idx)
                .map_err(|e| anyhow::anyhow!("computing the answer: {e}"));
            let result = answer.and_then(|(df, as_of)| {
                let rows = rows::from_frame(&df, &shape)?;
                let want = rows::due(rows, &held, emit, lateness, now_ms());
                let diff = rows::diff(&held, &want);
                Ok((want, diff, as_of))
            });
            (held, result)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the sink's answer task failed: {e}"))?;
        let (held, result) = computed;
        self.held = Some(held);
        let (want, diff, as_of) = result?;
        // Changes after `version` may or may not be in this answer: still behind since then.
        let behind = |now: u64| (now != version).then_some(started);
        let new_run = self.delivered_run.as_ref() != Some(&as_of.batch_run);
        if diff.is_empty() && !self.force && !(new_run && self.target.records_progress_alone()) {
            self.status
                .delivered(want.len(), None, behind(rt.version()));
            return Ok(());
        }
        self.target
            .apply(&Delivery {
                diff: &diff,
                rows: &want,
                as_of: &as_of,
            })
            .await?;
        tracing::debug!(
            pipeline = %self.status.pipeline, view = %self.status.view, sink = %self.status.name,
            upserts = diff.upserts.len(), deletes = diff.deletes.len(), "sink delivered"
        );
        self.status
            .delivered(want.len(), Some(&diff), behind(rt.version()));
        self.held = Some(want);
        self.force = false;
        self.delivered_run = Some(as_of.batch_run);
        Ok(())
    }
}

/// Waits until the speed layer has absorbed everything its log held at start (the replay of
/// the open segment runs after `serve` started): before that, the served answer lacks
/// acknowledged events, and a sink would write an answer it must take back. False when
/// `shutdown` came first.
async fn caught_up(served: &Served, shutdown: &CancellationToken) -> bool {
    let rt = &served.runtime;
    let goal: BTreeMap<u32, u64> = rt.partitions().into_iter().zip(rt.logged_end()).collect();
    let since = Instant::now();
    let mut warned = false;
    loop {
        let absorbed = rt.absorbed();
        let behind = |(p, end): (&u32, &u64)| absorbed.get(p).is_none_or(|a| a < end);
        if !goal.iter().any(behind) {
            return true;
        }
        if !warned && since.elapsed() > Duration::from_secs(30) {
            tracing::warn!(pipeline = %rt.pipeline.name, ?absorbed, logged = ?goal, "sinks wait for the speed layer to absorb the write-ahead log");
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}
