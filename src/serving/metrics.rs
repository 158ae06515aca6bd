//! `GET /metrics`: the speed layer's counters per pipeline, what serving answered per view,
//! the workflows (figures supplied by orchestration, which sits above serving) and the process,
//! in the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::future::BoxFuture;
use parking_lot::Mutex;

use super::query::Served;
use super::sink::SinkStatus;
use crate::clock::now_ms;
use crate::speed::runtime::PipelineRuntime;
use crate::state::VerifyStatus;
use crate::telemetry::Exposition;

/// Adds the workflow families to a page (orchestration's figures, read from the state DB).
pub type WorkflowMetrics =
    Arc<dyn Fn(Exposition) -> BoxFuture<'static, anyhow::Result<Exposition>> + Send + Sync>;

/// What the operator endpoints need besides the pipelines.
pub struct Ops {
    pub started: Instant,
    /// `/metrics` requires the bearer token too (`serve.protect_metrics`).
    pub protect_metrics: bool,
    pub workflows: Option<WorkflowMetrics>,
    pub served: ServedRows,
    /// Every sink `serve` runs (`sinks:` of the views), with its live figures.
    pub sinks: Vec<Arc<SinkStatus>>,
}

impl Ops {
    pub fn new(protect_metrics: bool) -> Ops {
        Ops {
            started: Instant::now(),
            protect_metrics,
            workflows: None,
            served: ServedRows::default(),
            sinks: Vec::new(),
        }
    }
}

/// Answers, batch rows and speed rows served of one view.
type ViewCounters = Arc<[AtomicU64; 3]>;

/// Partial rows merged into view answers, per (pipeline, view), from each layer.
#[derive(Default)]
pub struct ServedRows {
    views: Mutex<BTreeMap<(String, String), ViewCounters>>,
}

impl ServedRows {
    /// Records one answer of `pipeline.view`.
    pub fn record(&self, pipeline: &str, view: &str, batch_rows: u64, speed_rows: u64) {
        let slot = self
            .views
            .lock()
            .entry((pipeline.to_string(), view.to_string()))
            .or_default()
            .clone();
        slot[0].fetch_add(1, Ordering::Relaxed);
        slot[1].fetch_add(batch_rows, Ordering::Relaxed);
        slot[2].fetch_add(speed_rows, Ordering::Relaxed);
    }

    /// (answers, batch rows, speed rows) of `pipeline.view` so far.
    pub fn get(&self, pipeline: &str, view: &str) -> (u64, u64, u64) {
        self.views
            .lock()
            .get(&(pipeline.to_string(), view.to_string()))
            .map_or((0, 0, 0), |c| {
                (
                    c[0].load(Ordering::Relaxed),
                    c[1].load(Ordering::Relaxed),
                    c[2].load(Ordering::Relaxed),
                )
            })
    }
}

/// Seconds since a view's batch publication; `None` before its first one.
pub fn batch_cutoff_age_seconds(rt: &PipelineRuntime, view: usize) -> Option<f64> {
    let published = rt.published_at_ms(view)?;
    Some((now_ms() - published).max(0) as f64 / 1000.0)
}

/// Seconds since the oldest open segment's first event; 0 when every one is empty.
pub fn open_segment_age_seconds(rt: &PipelineRuntime) -> f64 {
    match rt.open_since_ms() {
        None => 0.0,
        Some(since) => (now_ms() as u64).saturating_sub(since) as f64 / 1000.0,
    }
}

/// The whole page.
pub async fn render(pipelines_served: &BTreeMap<String, Arc<Served>>, ops: &Ops) -> String {
    let runtimes: Vec<(&str, &PipelineRuntime)> = pipelines_served
        .iter()
        .map(|(p, s)| (p.as_str(), s.runtime.as_ref()))
        .collect();
    let mut e = Exposition::new();
    pipelines(&mut e, &runtimes);
    views(&mut e, &runtimes, ops);
    sinks(&mut e, &ops.sinks);
    if let Some(workflows) = &ops.workflows {
        // A state DB that cannot be read must not cost the pipeline figures: the failure is
        // logged and counted, the rest of the page still answers.
        let before = std::mem::take(&mut e);
        e = match workflows(Exposition::new()).await {
            Ok(w) => before.append(w),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "workflow metrics unavailable");
                let mut b = before;
                b.gauge(
                    "lambda_workflow_metrics_up",
                    "1 when the workflow figures could be read from the state DB.",
                    &[],
                    0.0,
                );
                b
            }
        };
    }
    e.gauge(
        "lambda_uptime_seconds",
        "Seconds since this server started.",
        &[],
        ops.started.elapsed().as_secs_f64(),
    );
    e.gauge(
        "lambda_build_info",
        "The lambda-ctl version serving (always 1).",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.finish()
}

fn pipelines(e: &mut Exposition, named: &[(&str, &PipelineRuntime)]) {
    type Counter = (&'static str, &'static str, fn(&PipelineRuntime) -> u64);
    let counters: [Counter; 4] = [
        (
            "lambda_events_accepted_total",
            "Events acknowledged by the door (durable in the write-ahead log).",
            |rt| rt.counters.accepted.load(Ordering::Relaxed),
        ),
        (
            "lambda_events_rejected_total",
            "Events rejected by the door (malformed; kept in the dead-letter area).",
            |rt| rt.counters.rejected.load(Ordering::Relaxed),
        ),
        (
            "lambda_events_deduplicated_total",
            "Events dropped as already acknowledged within the dedupe window.",
            |rt| rt.counters.duplicates.load(Ordering::Relaxed),
        ),
        (
            "lambda_filtered_events_total",
            "Accepted events the pipeline's filter dropped (archived, in no view).",
            |rt| rt.counters.filtered.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        for &(p, rt) in named {
            e.counter(name, help, &[("pipeline", p)], get(rt) as f64);
        }
    }
    for &(p, rt) in named {
        e.gauge(
            "lambda_ingest_rate_events_per_second",
            "Accepted events per second over the last 10 seconds.",
            &[("pipeline", p)],
            rt.counters.ingest_rate.lock().per_second(),
        );
    }
    for &(p, rt) in named {
        let lag = rt.source_status.lag().map(|l| l.by_key).unwrap_or_default();
        for (partition, lag) in lag {
            e.gauge(
                "lambda_source_lag_messages",
                "Messages the source has not yet consumed, per partition.",
                &[("pipeline", p), ("partition", &partition)],
                lag as f64,
            );
        }
    }
    for &(p, rt) in named {
        e.gauge(
            "lambda_open_segment_rows",
            "Events in the open (not yet sealed) segments, all partitions together.",
            &[("pipeline", p)],
            rt.open_rows() as f64,
        );
    }
    // Per partition: durable events the speed layer has not absorbed yet, its open segment,
    // whether this server runs it — each family's samples together, as the format requires.
    type PerLane = fn(&PipelineRuntime, &crate::speed::runtime::Lane) -> f64;
    let per_lane: [(&str, &str, PerLane); 3] = [
        (
            "lambda_partition_unabsorbed_events",
            "Events durable in a partition's write-ahead log that queries do not see yet.",
            |rt, lane| {
                let done = rt.absorbed().get(&lane.partition).copied().unwrap_or(0);
                lane.logged_end().saturating_sub(done) as f64
            },
        ),
        (
            "lambda_partition_open_segment_rows",
            "Events in a partition's open (not yet sealed) segment.",
            |_, lane| lane.open_rows() as f64,
        ),
        (
            "lambda_partition_running",
            "1 where this server runs the partition (on a node: holds its lease), else 0.",
            |rt, lane| if rt.owns(lane.partition) { 1.0 } else { 0.0 },
        ),
    ];
    for (name, help, value) in per_lane {
        for &(p, rt) in named {
            for lane in rt.lanes() {
                let partition = lane.partition.to_string();
                let labels = [("pipeline", p), ("partition", partition.as_str())];
                e.gauge(name, help, &labels, value(rt, lane));
            }
        }
    }
    for &(p, rt) in named {
        e.gauge(
            "lambda_open_segment_age_seconds",
            "Seconds since the oldest open segment's first event (0 when every one is empty).",
            &[("pipeline", p)],
            open_segment_age_seconds(rt),
        );
    }
    for &(p, rt) in named {
        e.gauge(
            "lambda_sealed_segments",
            "Sealed Parquet segments in the archive.",
            &[("pipeline", p)],
            rt.counters.sealed_segments.load(Ordering::Relaxed) as f64,
        );
    }
    type LookupFigure = (
        &'static str,
        &'static str,
        bool,
        fn(&crate::speed::lookups::LookupStatus) -> u64,
    );
    let lookup_figures: [LookupFigure; 3] = [
        (
            "lambda_lookup_refresh_failures_total",
            "Reads of a lookup's source that failed (the previous version stayed in use).",
            true,
            |s| s.failures.load(Ordering::Relaxed),
        ),
        (
            "lambda_lookup_refreshes_total",
            "Reads of a lookup's source that succeeded.",
            true,
            |s| s.refreshes.load(Ordering::Relaxed),
        ),
        (
            "lambda_lookup_rows",
            "Rows of the lookup's newest version read from its source.",
            false,
            |s| s.rows.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, counter, get) in lookup_figures {
        for &(p, rt) in named {
            for (l, status) in rt.pipeline.lookups.iter().zip(&rt.lookups.status) {
                let labels = [("pipeline", p), ("lookup", l.name.as_str())];
                if counter {
                    e.counter(name, help, &labels, get(status) as f64);
                } else {
                    e.gauge(name, help, &labels, get(status) as f64);
                }
            }
        }
    }
    // One lock per pipeline for both speed-state figures.
    let speed: Vec<(&str, usize, usize)> = named
        .iter()
        .map(|&(p, rt)| {
            let (groups, bytes) = rt.held();
            (p, groups, bytes)
        })
        .collect();
    for &(p, groups, _) in &speed {
        e.gauge(
            "lambda_speed_state_groups",
            "Partial rows the speed layer holds (segments not covered by a batch view).",
            &[("pipeline", p)],
            groups as f64,
        );
    }
    for &(p, _, bytes) in &speed {
        e.gauge(
            "lambda_speed_state_bytes",
            "Estimated memory of the speed layer's partials.",
            &[("pipeline", p)],
            bytes as f64,
        );
    }
    for &(p, rt) in named {
        e.histogram(
            "lambda_ack_to_visible_seconds",
            "From a request's acknowledgement to its events being visible in queries.",
            &[("pipeline", p)],
            &rt.counters.ack_to_visible.snapshot(),
        );
    }
    verified(e, named);
}

/// The latest `verify` of each pipeline that had one (`verify` tasks, `lambda-ctl verify`).
fn verified(e: &mut Exposition, named: &[(&str, &PipelineRuntime)]) {
    let latest: Vec<(&str, VerifyStatus)> = named
        .iter()
        .filter_map(|&(p, rt)| Some((p, rt.verified.read().clone()?)))
        .collect();
    let seconds = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    for (p, v) in &latest {
        e.gauge(
            "lambda_verify_ok",
            "1 when the pipeline's latest verify found nothing wrong, 0 when it found a problem.",
            &[("pipeline", p)],
            if v.last.ok { 1.0 } else { 0.0 },
        );
    }
    for (p, v) in &latest {
        e.gauge(
            "lambda_verify_problems",
            "Problems the pipeline's latest verify found (damaged segments, engine differences).",
            &[("pipeline", p)],
            v.last.problems.len() as f64,
        );
    }
    for (p, v) in &latest {
        e.gauge(
            "lambda_verify_last_run_timestamp_seconds",
            "When the pipeline's latest verify finished (Unix time).",
            &[("pipeline", p)],
            seconds(v.last.finished_at),
        );
    }
    for (p, v) in &latest {
        if let Some(t) = v.last_success {
            e.gauge(
                "lambda_verify_last_success_timestamp_seconds",
                "When a verify of the pipeline last found nothing wrong (Unix time).",
                &[("pipeline", p)],
                seconds(t),
            );
        }
    }
}

fn views(e: &mut Exposition, runtimes: &[(&str, &PipelineRuntime)], ops: &Ops) {
    let all = || {
        runtimes.iter().flat_map(|&(p, rt)| {
            let plan = rt.plan();
            let names: Vec<String> = plan
                .pipeline()
                .views
                .iter()
                .map(|v| v.name.clone())
                .collect();
            names
                .into_iter()
                .enumerate()
                .map(move |(i, v)| (p, i, v, rt))
        })
    };
    for (p, i, v, rt) in all() {
        let v = v.as_str();
        if let Some(age) = batch_cutoff_age_seconds(rt, i) {
            e.gauge(
                "lambda_view_batch_cutoff_age_seconds",
                "Seconds since the view's batch publication (how stale the batch layer is).",
                &[("pipeline", p), ("view", v)],
                age,
            );
        }
    }
    // The restatement ledger (late events only in views whose windows end).
    let ledger =
        |rt: &PipelineRuntime, v: &str| rt.restated.read().get(v).copied().unwrap_or_default();
    for (p, _, v, rt) in all() {
        let v = v.as_str();
        e.counter(
            "lambda_late_events_total",
            "Events archived after the end of a window they fall in (restating it).",
            &[("pipeline", p), ("view", v)],
            ledger(rt, v).late_events as f64,
        );
    }
    for (p, _, v, rt) in all() {
        let v = v.as_str();
        e.counter(
            "lambda_restated_windows_total",
            "Restatement ledger entries: a window and group whose served value changed (late events, a restating publication).",
            &[("pipeline", p), ("view", v)],
            ledger(rt, v).restated_windows as f64,
        );
    }
    for (p, _, v, rt) in all() {
        let v = v.as_str();
        e.gauge(
            "lambda_late_max_lateness_seconds",
            "The latest any event arrived after the end of its window (0 when none was late).",
            &[("pipeline", p), ("view", v)],
            ledger(rt, v).max_lateness_ms as f64 / 1000.0,
        );
    }
    for (p, _, v, _) in all() {
        let v = v.as_str();
        e.counter(
            "lambda_view_queries_total",
            "View answers served.",
            &[("pipeline", p), ("view", v)],
            ops.served.get(p, v).0 as f64,
        );
    }
    for (p, _, v, _) in all() {
        let v = v.as_str();
        let (_, batch, speed) = ops.served.get(p, v);
        for (layer, rows) in [("batch", batch), ("speed", speed)] {
            e.counter(
                "lambda_view_rows_served_total",
                "Partial rows merged into view answers, by the layer they came from.",
                &[("pipeline", p), ("view", v), ("layer", layer)],
                rows as f64,
            );
        }
    }
}

fn sinks(e: &mut Exposition, sinks: &[Arc<SinkStatus>]) {
    let labels = |s: &SinkStatus| {
        [
            ("pipeline", s.pipeline.clone()),
            ("view", s.view.clone()),
            ("sink", s.name.clone()),
        ]
    };
    for s in sinks {
        let l = labels(s);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        e.gauge(
            "lambda_sink_lag_seconds",
            "How long the sink's destination has lagged behind the served answer (0: up to date).",
            &l,
            s.lag_seconds(),
        );
    }
    for s in sinks {
        let l = labels(s);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        e.gauge(
            "lambda_sink_up",
            "1 when the sink's last delivery (or check) succeeded.",
            &l,
            if s.up() { 1.0 } else { 0.0 },
        );
    }
    for s in sinks {
        let base = labels(s);
        for (op, n) in [
            ("upsert", s.upserted.load(Ordering::Relaxed)),
            ("delete", s.deleted.load(Ordering::Relaxed)),
        ] {
            let mut l: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
            l.push(("op", op));
            e.counter(
                "lambda_sink_rows_total",
                "Rows written to the sink's destination (upserted, or deleted/tombstoned).",
                &l,
                n as f64,
            );
        }
    }
    for s in sinks {
        let l = labels(s);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        e.counter(
            "lambda_sink_failures_total",
            "Deliveries (or opens) of the sink that failed and were retried.",
            &l,
            s.failures.load(Ordering::Relaxed) as f64,
        );
    }
}
