//! One pipeline's speed layer: the door (decode → dead letters → de-duplicate → write-ahead
//! log), the aggregator (micro-batches through the plan into partials of the open segment) and
//! the archiver (seal the open segment into a Parquet file in the lake + manifest row and
//! checkpoint in one state transaction). Recovery at start rebuilds partials of uncovered sealed
//! segments from their Parquet files and replays the open segment from the log.
//!
//! Position-less sources (HTTP, generator, file) use partition 0 of the pipeline's own log.
//!
//! Fail closed: a micro-batch is absorbed whole or not at all, and the open segment only grows
//! when it is. When one fails, the aggregator absorbs nothing more and rebuilds the open segment
//! from the write-ahead log (retrying with back-off); no segment is sealed meanwhile, and a
//! segment is sealed only if it holds exactly one row per position.
//!
//! Bounded: the log hands durable events to the aggregator through a channel of
//! [`AGGREGATOR_QUEUE`] micro-batches; when the aggregator falls behind, the log's writer and
//! then the door wait.

use std::io::Cursor;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use polars::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::dedupe::Dedupe;
use super::log::{self, Log};
use super::partials::{BatchView, Snapshot, SpeedState};
use super::status::SourceStatus;
use crate::lake::{self, Lake};
use crate::plan::{Decoded, Plan};
use crate::clock::now_ms;
use crate::spec::Pipeline;
use crate::state::{self, Segment, State};
use crate::telemetry::{Histogram, LATENCY_BUCKETS, RateMeter};

/// The partition of the pipeline's own write-ahead log.
const LOG_PARTITION: u32 = 0;
/// Durable requests waiting for the aggregator at most (see the module docs).
pub const AGGREGATOR_QUEUE: usize = 64;
/// Longest wait between attempts to rebuild the open segment after a failure.
const MAX_REBUILD_BACKOFF: Duration = Duration::from_secs(30);
/// Archive columns added to the schema's: the event's position and arrival time.
pub const OFFSET_COLUMN: &str = "_offset";
pub const ARRIVAL_COLUMN: &str = "_arrival";

/// What the door answers for one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub accepted: u64,
    pub rejected: u64,
    /// Dropped as already acknowledged within `dedupe_window` (not an error).
    pub duplicates: u64,
    pub errors: Vec<LineError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

/// Counters for `status` and `/metrics`.
pub struct Counters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    /// Accepted events the pipeline's `filter` dropped from every view (they are archived;
    /// replayed events are not counted again).
    pub filtered: AtomicU64,
    pub sealed_segments: AtomicU64,
    pub open_rows: AtomicU64,
    /// Arrival time of the open segment's first event (0 when empty).
    pub open_since_ms: AtomicU64,
    /// Rejections not yet recorded with a sealed segment (persisted by the next seal).
    pub rejected_unsealed: AtomicU64,
    /// From a request's acknowledgement (its events durable) to its events being visible in
    /// queries (absorbed into the open segment's partials).
    pub ack_to_visible: Histogram,
    /// Accepted events per second, sampled by the aggregator's tick.
    pub ingest_rate: Mutex<RateMeter>,
}

/// The window [`Counters::ingest_rate`] averages over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Default for Counters {
    fn default() -> Self {
        Counters {
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            sealed_segments: AtomicU64::new(0),
            open_rows: AtomicU64::new(0),
            open_since_ms: AtomicU64::new(0),
            rejected_unsealed: AtomicU64::new(0),
            ack_to_visible: Histogram::new(LATENCY_BUCKETS),
            ingest_rate: Mutex::new(RateMeter::new(RATE_WINDOW)),
        }
    }
}

/// Decoded events travelling with their log records to the aggregator.
pub struct Batch {
    events: DataFrame,
    arrival_ms: i64,
    /// Set by the door once the append is acknowledged; `None` for replayed events.
    acked: Option<Arc<OnceLock<Instant>>>,
}

pub struct PipelineRuntime {
    pub pipeline: Arc<Pipeline>,
    pub plan: Arc<Plan>,
    /// Partials and published batch views; serving reads them through [`Self::snapshot`].
    state: Arc<RwLock<SpeedState>>,
    pub counters: Arc<Counters>,
    /// What the pipeline's source reports (lag), for status and metrics.
    pub source_status: Arc<SourceStatus>,
    log: Log<Batch>,
    /// End (exclusive) of the write-ahead log: every position below it is durable.
    logged_end: AtomicU64,
    /// End (exclusive) of the sealed segments: every position below it is in the archive
    /// (manifest + checkpoint committed). Sources that may only acknowledge archived events
    /// (kafka) wait on it.
    sealed_end: watch::Sender<u64>,
    /// Held across admit → append so a failed append can un-admit its ids.
    dedupe: Option<Arc<Mutex<Dedupe>>>,
    lake: Lake,
    db: State,
    /// Test hook: this many coming micro-batches fail as if the plan had failed on them.
    #[cfg(test)]
    fail_applies: std::sync::atomic::AtomicU32,
}

impl PipelineRuntime {
    /// Recovers the pipeline's speed state and starts its aggregator/archiver task.
    pub async fn start(
        pipeline: Arc<Pipeline>,
        plan: Arc<Plan>,
        db: State,
        lake: Lake,
        log_dir: &Path,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<PipelineRuntime>> {
        let name = pipeline.name.clone();
        let views = pipeline.views.len();
        let speed = Arc::new(RwLock::new(SpeedState::new(views)));
        let counters = Arc::new(Counters::default());
        let dedupe = pipeline
            .event_id
            .as_ref()
            .map(|_| Arc::new(Mutex::new(Dedupe::new(pipeline.dedupe_window))));

        // Sealed segments: rebuild their partials (and recent ids) from the lake — except
        // those every view's published batch (of the current logic) covers: the batch view
        // serves them, and a restart reads only what it needs, not the whole archive.
        let checkpoint = db.checkpoint(&name, LOG_PARTITION).await?.unwrap_or(0);
        let segments = db.segments(&name).await?;
        counters
            .sealed_segments
            .store(segments.len() as u64, Ordering::Relaxed);
        let dedupe_horizon =
            now_ms() - i64::try_from(pipeline.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        let covered = db
            .covered_where(&pipeline, |v, p| p.logic_hash == plan.logic_hash(v))
            .await?;
        let sealed_at = match (&covered, &dedupe) {
            (Some(_), Some(_)) => db.sealed_at(&name).await?,
            _ => Default::default(),
        };
        let mut skipped = 0usize;
        for seg in &segments {
            let is_covered = covered
                .as_ref()
                .is_some_and(|c| state::is_covered(c, seg));
            // Ids that arrived within the dedupe window are in segments sealed after its start.
            let has_recent_ids = dedupe.is_some()
                && sealed_at
                    .get(&(seg.partition, seg.lo))
                    .is_none_or(|at| at.timestamp_millis() > dedupe_horizon);
            if is_covered && !has_recent_ids {
                skipped += 1;
                continue;
            }
            let bytes = lake
                .get(&seg.path)
                .await
                .with_context(|| format!("reading segment {}", seg.path))?;
            let events =
                read_parquet(bytes).with_context(|| format!("decoding segment {}", seg.path))?;
            if let (Some(d), Some(id_col)) = (&dedupe, &pipeline.event_id)
                && seg.max_event_ms.is_some()
            {
                admit_recent(&mut d.lock(), &events, id_col, dedupe_horizon)?;
            }
            if is_covered {
                continue;
            }
            let parts = partials_of(&plan, &events)?;
            let mut st = speed.write();
            st.absorb(
                &plan,
                seg.partition,
                seg.lo,
                seg.hi,
                events.height() as u64,
                parts,
            )?;
            st.seal(seg.partition, seg.lo, seg.hi);
        }
        if skipped > 0 {
            tracing::info!(
                pipeline = %name,
                skipped,
                "sealed segments covered by the published batch views are served from them, not read"
            );
        }

        // The log, with its consumer: the aggregator.
        let log_dir = log_dir.join(&name).join(format!("p={LOG_PARTITION}"));
        ensure_log_starts_at(&log_dir, checkpoint)?;
        let (tx, rx) = mpsc::channel(AGGREGATOR_QUEUE);
        let (log, next) = Log::open(&log_dir, Some(tx.clone()))?;
        anyhow::ensure!(
            next >= checkpoint,
            "write-ahead log {} ends at {next} but the archive is sealed up to {checkpoint}; the log directory was replaced",
            log_dir.display()
        );

        // Replay the open segment: log records at or after the checkpoint.
        let replay = log::read_from(&log_dir, checkpoint)?;
        if !replay.is_empty() {
            let first = replay[0].0;
            let last = replay[replay.len() - 1].0 + 1;
            let events = decode_records(&plan, &replay)?;
            if let (Some(d), Some(id_col)) = (&dedupe, &pipeline.event_id) {
                admit_recent(&mut d.lock(), &events, id_col, dedupe_horizon)?;
            }
            tracing::info!(pipeline = %name, from = first, to = last, "replaying write-ahead log");
            // The channel is empty: nothing was appended yet.
            tx.try_send((
                first..last,
                Batch {
                    events,
                    arrival_ms: now_ms(),
                    acked: None,
                },
            ))
            .map_err(|_| anyhow::anyhow!("cannot hand the replayed log to the aggregator"))?;
        }
        drop(tx);

        let rt = Arc::new(PipelineRuntime {
            pipeline: pipeline.clone(),
            plan: plan.clone(),
            state: speed,
            counters,
            source_status: Arc::new(SourceStatus::default()),
            log,
            logged_end: AtomicU64::new(next),
            sealed_end: watch::Sender::new(checkpoint),
            dedupe,
            lake,
            db,
            #[cfg(test)]
            fail_applies: Default::default(),
        });
        let aggregator = Aggregator::new(rt.clone(), checkpoint);
        tokio::spawn(aggregator.run(rx, shutdown));
        Ok(rt)
    }

    /// What a query of view `view` merges — the published batch view and the speed partials
    /// of the segments it does not cover — taken under one lock.
    pub fn snapshot(&self, view: usize) -> Snapshot {
        self.state.read().snapshot(view)
    }

    /// Changes with every absorb, seal and publish: an answer computed from a snapshot of this
    /// version is still the answer while it holds.
    pub fn version(&self) -> u64 {
        self.state.read().version()
    }

    /// Installs a published batch view of view `view` (serving's pickup); the segments every
    /// view's batch now covers are freed.
    pub fn publish(&self, view: usize, batch: BatchView) {
        self.state.write().publish(view, batch);
    }

    /// When view `view`'s batch view was published (epoch ms); `None` before its first one.
    pub fn published_at_ms(&self, view: usize) -> Option<i64> {
        Some(self.state.read().batch.get(view)?.as_ref()?.published_at_ms)
    }

    /// Partial rows the speed layer holds, and their estimated memory, read under one lock.
    pub fn held(&self) -> (usize, usize) {
        let st = self.state.read();
        (st.groups(), st.estimated_bytes())
    }

    /// End (exclusive) of the write-ahead log: positions below it are durable. Read after
    /// `ingest` returned, it is at or above every position that call wrote (or, for events it
    /// dropped as duplicates, of the earlier copies).
    pub fn logged_end(&self) -> u64 {
        self.logged_end.load(Ordering::Acquire)
    }

    /// Watches the end (exclusive) of the sealed segments: positions below it are archived
    /// and will never be replayed from the log. Starts at the checkpoint recovered at start.
    pub fn sealed_end(&self) -> watch::Receiver<u64> {
        self.sealed_end.subscribe()
    }

    /// The door: NDJSON/CSV bytes in; returns after every accepted event is durable.
    pub async fn ingest(&self, body: Bytes) -> anyhow::Result<IngestReport> {
        let plan = self.plan.clone();
        let decoded = if body.len() > 64 * 1024 {
            let b = body.clone();
            tokio::task::spawn_blocking(move || plan.decode(&b)).await?
        } else {
            plan.decode(&body)
        };
        let mut report = IngestReport::default();
        let arrival = now_ms();
        if !decoded.rejected.is_empty() {
            self.dead_letter(&decoded, arrival).await?;
            report.rejected = decoded.rejected.len() as u64;
            report.errors = decoded
                .rejected
                .iter()
                .map(|r| LineError {
                    line: r.line,
                    reason: r.reason.clone(),
                })
                .collect();
            self.counters
                .rejected
                .fetch_add(report.rejected, Ordering::Relaxed);
            self.counters
                .rejected_unsealed
                .fetch_add(report.rejected, Ordering::Relaxed);
        }
        let Decoded {
            mut events,
            records: mut sources,
            header,
            ..
        } = decoded;
        anyhow::ensure!(
            sources.len() == events.height(),
            "decoder returned {} events for {} records",
            events.height(),
            sources.len()
        );
        let header = header.and_then(|h| body.get(h));

        // De-duplicate at the door.
        let mut admitted_ids: Vec<Vec<u8>> = Vec::new();
        if let (Some(d), Some(id_col)) = (&self.dedupe, &self.pipeline.event_id) {
            let ids = id_strings(&events, id_col)?;
            let mut keep = Vec::with_capacity(ids.len());
            let mut d = d.lock();
            for id in &ids {
                let new = match id {
                    Some(id) => d.admit(id.as_bytes(), arrival),
                    None => true,
                };
                if new && let Some(id) = id {
                    admitted_ids.push(id.as_bytes().to_vec());
                }
                keep.push(new);
            }
            drop(d);
            let dups = keep.iter().filter(|k| !**k).count() as u64;
            if dups > 0 {
                let mask = BooleanChunked::from_slice("keep".into(), &keep);
                events = events.filter(&mask)?;
                let mut it = keep.iter();
                sources.retain(|_| *it.next().unwrap_or(&true));
                report.duplicates = dups;
                self.counters.duplicates.fetch_add(dups, Ordering::Relaxed);
            }
        }
        if events.height() == 0 {
            return Ok(report);
        }
        let records: Vec<Vec<u8>> = sources
            .into_iter()
            .map(|r| encode_record(arrival, header, &body[r]))
            .collect();
        let n = records.len() as u64;
        let acked = Arc::new(OnceLock::new());
        let appended = self
            .log
            .append(
                records,
                Batch {
                    events,
                    arrival_ms: arrival,
                    acked: Some(acked.clone()),
                },
            )
            .await;
        let range = match appended {
            Ok(range) => range,
            Err(e) => {
                if let Some(d) = &self.dedupe {
                    let mut d = d.lock();
                    admitted_ids.iter().for_each(|id| d.forget(id));
                }
                return Err(e.into());
            }
        };
        let _ = acked.set(Instant::now());
        self.logged_end.fetch_max(range.end, Ordering::AcqRel);
        report.accepted = n;
        self.counters.accepted.fetch_add(n, Ordering::Relaxed);
        Ok(report)
    }

    async fn dead_letter(&self, decoded: &Decoded, arrival: i64) -> anyhow::Result<()> {
        let mut body = String::new();
        for r in &decoded.rejected {
            let rec = serde_json::json!({"line": r.line, "reason": r.reason, "raw": r.raw, "received_at": crate::clock::format_ms(arrival)});
            body.push_str(&rec.to_string());
            body.push('\n');
        }
        let path = lake::dead_letter_path(&self.pipeline.name, arrival, &uuid_like());
        self.lake
            .put(&path, Bytes::from(body))
            .await
            .with_context(|| format!("writing dead letters to {path}"))?;
        Ok(())
    }
}

/// A unique-enough suffix for dead-letter files (time + counter + process id).
fn uuid_like() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The aggregator/archiver task state: the open segment of the log partition.
struct Aggregator {
    rt: Arc<PipelineRuntime>,
    /// First position of the open segment.
    lo: u64,
    /// Next position expected (= end of the open segment so far): every position in
    /// `[lo, next)` is absorbed, and nothing else.
    next: u64,
    /// Raw events of the open segment, for its Parquet file.
    events: Vec<DataFrame>,
    rows: u64,
    opened: Option<Instant>,
    /// Set when a micro-batch failed: nothing is absorbed or sealed until the open segment is
    /// rebuilt from the log, which is next tried at this instant.
    rebuild_at: Option<Instant>,
    /// Failed attempts in a row (for the back-off).
    failures: u32,
}

impl Aggregator {
    fn new(rt: Arc<PipelineRuntime>, checkpoint: u64) -> Self {
        Aggregator {
            rt,
            lo: checkpoint,
            next: checkpoint,
            events: Vec::new(),
            rows: 0,
            opened: None,
            rebuild_at: None,
            failures: 0,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<log::Durable<Batch>>,
        shutdown: CancellationToken,
    ) {
        let age = self.rt.pipeline.archive.segment_age;
        let mut tick = tokio::time::interval(Duration::from_millis(250).min(age));
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    // Adaptive micro-batch: everything that arrived while the last one ran.
                    let mut batch = vec![first];
                    while batch.len() < 1024 && let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    // While broken, the events wait in the log: the rebuild reads them there.
                    if self.rebuild_at.is_none()
                        && let Err(e) = self.apply(batch).await
                    {
                        self.fail(e, "speed layer failed to apply a micro-batch");
                    }
                }
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            if self.rebuild_at.is_some_and(|at| at <= Instant::now()) {
                match self.rebuild().await {
                    Ok(()) => {
                        tracing::info!(pipeline = %self.rt.pipeline.name, from = self.lo, to = self.next, "rebuilt the open segment from the write-ahead log");
                        self.rebuild_at = None;
                        self.failures = 0;
                    }
                    Err(e) => self.fail(
                        e,
                        "rebuilding the open segment from the write-ahead log failed",
                    ),
                }
            }
            let accepted = self.rt.counters.accepted.load(Ordering::Relaxed);
            self.rt
                .counters
                .ingest_rate
                .lock()
                .record(accepted, Instant::now());
            if self.rebuild_at.is_none() && self.should_seal() {
                if self.rows != self.next - self.lo {
                    let e = anyhow::anyhow!(
                        "the open segment holds {} events for positions {}..{}",
                        self.rows,
                        self.lo,
                        self.next
                    );
                    self.fail(e, "refusing to seal an incomplete segment");
                } else if let Err(e) = self.seal().await {
                    tracing::error!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "sealing segment failed; will retry");
                }
            }
        }
    }

    /// Stops absorbing: the open segment is rebuilt from the log, at once the first time, then
    /// with a growing back-off while rebuilding fails too.
    fn fail(&mut self, e: anyhow::Error, what: &str) {
        let backoff = if self.failures == 0 {
            Duration::ZERO
        } else {
            (Duration::from_secs(1) * 2u32.saturating_pow(self.failures - 1))
                .min(MAX_REBUILD_BACKOFF)
        };
        tracing::error!(
            pipeline = %self.rt.pipeline.name,
            error = %format!("{e:#}"),
            retry_in_ms = backoff.as_millis() as u64,
            "{what}; absorbing nothing until the open segment is rebuilt from the write-ahead log"
        );
        self.failures = self.failures.saturating_add(1);
        self.rebuild_at = Some(Instant::now() + backoff);
    }

    /// Forgets the open segment and absorbs it again from the log: every durable record from
    /// its start. Micro-batches still on their way for those records are skipped by `apply`.
    async fn rebuild(&mut self) -> anyhow::Result<()> {
        let rt = self.rt.clone();
        rt.state.write().discard_open(LOG_PARTITION, self.lo);
        self.next = self.lo;
        self.events.clear();
        self.rows = 0;
        self.opened = None;
        rt.counters.open_rows.store(0, Ordering::Relaxed);
        rt.counters.open_since_ms.store(0, Ordering::Relaxed);
        let (lo, end) = (self.lo, rt.log.durable_end());
        if end <= lo {
            return Ok(());
        }
        let dir = rt.log.dir().to_path_buf();
        let plan = rt.plan.clone();
        let events = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut records = log::read_from(&dir, lo)?;
            records.retain(|(offset, _)| *offset < end);
            anyhow::ensure!(
                records.len() as u64 == end - lo && records.first().map(|r| r.0) == Some(lo),
                "the write-ahead log {} holds {} of the records {lo}..{end}",
                dir.display(),
                records.len()
            );
            decode_records(&plan, &records)
        })
        .await??;
        self.apply(vec![(
            lo..end,
            Batch {
                events,
                arrival_ms: now_ms(),
                acked: None,
            },
        )])
        .await
    }

    /// Absorbs durable requests into the open segment — all of them, or (on error) none.
    async fn apply(&mut self, batch: Vec<log::Durable<Batch>>) -> anyhow::Result<()> {
        let mut frames = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        // (events, fresh) per frame: replayed events were counted by the process that took them.
        let mut sizes = Vec::with_capacity(batch.len());
        let mut next = self.next;
        for (range, b) in batch {
            if range.end <= next {
                // Absorbed already, by a rebuild from the log.
                continue;
            }
            anyhow::ensure!(
                range.start == next,
                "position gap: expected {next}, got {}",
                range.start
            );
            next = range.end;
            sizes.push((range.end - range.start, b.acked.is_some()));
            acks.extend(b.acked);
            frames.push(with_positions(b.events, range, b.arrival_ms)?);
        }
        if frames.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self
            .rt
            .fail_applies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            anyhow::bail!("injected failure of the plan");
        }
        let rt = self.rt.clone();
        let (events, parts, filtered) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let events = concat_frames(frames)?;
                let (parts, keep) = rt.plan.partials_masked(events.clone())?;
                let filtered = dropped_fresh(keep.as_ref(), &sizes)?;
                Ok((events, parts, filtered))
            })
            .await??;
        let rows = events.height() as u64;
        anyhow::ensure!(
            rows == next - self.next,
            "{rows} events for positions {}..{next}",
            self.next
        );
        self.rt
            .state
            .write()
            .absorb(&self.rt.plan, LOG_PARTITION, self.lo, next, rows, parts)?;
        // Absorbed: only now does the open segment take the positions.
        self.next = next;
        if self.opened.is_none() {
            self.opened = Some(Instant::now());
            self.rt
                .counters
                .open_since_ms
                .store(now_ms() as u64, Ordering::Relaxed);
        }
        self.rows += rows;
        self.events.push(events);
        self.rt
            .counters
            .open_rows
            .store(self.rows, Ordering::Relaxed);
        self.rt
            .counters
            .filtered
            .fetch_add(filtered, Ordering::Relaxed);
        // Visible now. A request whose reply has not reached the door yet was visible before
        // it was acknowledged: zero latency.
        for ack in acks {
            let latency = ack.get().map_or(Duration::ZERO, Instant::elapsed);
            self.rt.counters.ack_to_visible.observe(latency);
        }
        Ok(())
    }

    fn should_seal(&self) -> bool {
        let a = &self.rt.pipeline.archive;
        self.next > self.lo
            && (self.rows >= a.segment_rows
                || self.opened.is_some_and(|t| t.elapsed() >= a.segment_age))
    }

    /// Parquet file into the lake, then manifest row + checkpoint in one transaction, then the
    /// log below the segment may go. A crash between the steps leaves an orphan file (rewritten
    /// on replay) or a complete segment — never half of one.
    async fn seal(&mut self) -> anyhow::Result<()> {
        let rt = self.rt.clone();
        let (lo, hi) = (self.lo, self.next);
        anyhow::ensure!(
            self.rows == hi - lo,
            "the open segment holds {} events for positions {lo}..{hi}",
            self.rows
        );
        let frames = self.events.clone();
        let event_time = rt.pipeline.event_time.clone();
        let (bytes, rows, min_ms, max_ms) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut df = concat_frames(frames)?;
                let (min_ms, max_ms) = time_range(&df, &event_time)?;
                let mut buf = Vec::new();
                ParquetWriter::new(&mut buf)
                    .with_compression(ParquetCompression::Zstd(None))
                    .finish(&mut df)?;
                Ok((buf, df.height() as u64, min_ms, max_ms))
            })
            .await??;
        anyhow::ensure!(
            rows == hi - lo,
            "segment {lo}..{hi} would hold {rows} events"
        );
        let path = lake::archive_path(&rt.pipeline.name, LOG_PARTITION, lo, hi);
        let size = bytes.len() as u64;
        rt.lake
            .put(&path, Bytes::from(bytes))
            .await
            .with_context(|| format!("writing segment {path}"))?;
        let segment = Segment {
            pipeline: rt.pipeline.name.clone(),
            partition: LOG_PARTITION,
            lo,
            hi,
            path: path.clone(),
            rows,
            bytes: size,
            dead_letters: rt.counters.rejected_unsealed.load(Ordering::Relaxed),
            min_event_ms: min_ms,
            max_event_ms: max_ms,
        };
        rt.db
            .seal_segment(&segment)
            .await
            .with_context(|| format!("recording segment {path}"))?;
        rt.counters
            .rejected_unsealed
            .fetch_sub(segment.dead_letters, Ordering::Relaxed);
        rt.state.write().seal(LOG_PARTITION, lo, hi);
        rt.sealed_end.send_replace(hi);
        if let Err(e) = rt.log.truncate_below(hi) {
            tracing::warn!(pipeline = %rt.pipeline.name, error = %e, "could not truncate the write-ahead log");
        }
        tracing::info!(pipeline = %rt.pipeline.name, segment = %path, rows, "sealed segment");
        rt.counters.sealed_segments.fetch_add(1, Ordering::Relaxed);
        rt.counters.open_rows.store(0, Ordering::Relaxed);
        rt.counters.open_since_ms.store(0, Ordering::Relaxed);
        self.lo = hi;
        self.events.clear();
        self.rows = 0;
        self.opened = None;
        Ok(())
    }
}

/// Partials of every view for raw (decoded) events.
pub fn partials_of(plan: &Plan, events: &DataFrame) -> anyhow::Result<Vec<DataFrame>> {
    // Prepared once for every view, not once per view.
    Ok(plan.partials_all(events.clone())?)
}

/// How many fresh events the pipeline's filter dropped, from its mask over a micro-batch
/// (None: no filter); `frames` gives the (events, fresh) of the frames it stacks, in order.
fn dropped_fresh(keep: Option<&BooleanChunked>, frames: &[(u64, bool)]) -> anyhow::Result<u64> {
    let Some(keep) = keep else {
        return Ok(0);
    };
    let (mut offset, mut dropped) = (0usize, 0u64);
    for &(n, fresh) in frames {
        let n = usize::try_from(n)?;
        if fresh {
            // Valid and true: a null result drops the event, as the filter does.
            let kept = keep.slice(i64::try_from(offset)?, n).num_trues();
            dropped += (n - kept) as u64;
        }
        offset += n;
    }
    Ok(dropped)
}

fn with_positions(
    mut events: DataFrame,
    range: Range<u64>,
    arrival_ms: i64,
) -> anyhow::Result<DataFrame> {
    let n = events.height();
    anyhow::ensure!(
        n as u64 == range.end - range.start,
        "{} events for positions {range:?}",
        n
    );
    let offsets: Vec<i64> = (range.start..range.end).map(|o| o as i64).collect();
    events.with_column(Column::new(OFFSET_COLUMN.into(), offsets))?;
    // Replayed events keep the arrival time they were logged with.
    if events.column(ARRIVAL_COLUMN).is_err() {
        let arrival = Column::new(ARRIVAL_COLUMN.into(), vec![arrival_ms; n])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        events.with_column(arrival)?;
    }
    // One column order for fresh and replayed events, so their frames stack into a segment.
    let mut order: Vec<PlSmallStr> = events
        .get_column_names()
        .into_iter()
        .filter(|c| c.as_str() != OFFSET_COLUMN && c.as_str() != ARRIVAL_COLUMN)
        .cloned()
        .collect();
    order.extend([OFFSET_COLUMN.into(), ARRIVAL_COLUMN.into()]);
    Ok(events.select(order)?)
}

fn concat_frames(frames: Vec<DataFrame>) -> anyhow::Result<DataFrame> {
    let mut it = frames.into_iter();
    let mut out = it.next().context("no events")?;
    for f in it {
        out.vstack_mut_owned(f)?;
    }
    out.rechunk_mut();
    Ok(out)
}

fn time_range(df: &DataFrame, col: &str) -> anyhow::Result<(Option<i64>, Option<i64>)> {
    let c = df.column(col)?.cast(&DataType::Int64)?;
    let ca = c.i64()?;
    Ok((ca.min(), ca.max()))
}

pub fn read_parquet(bytes: Bytes) -> anyhow::Result<DataFrame> {
    Ok(ParquetReader::new(Cursor::new(bytes)).finish()?)
}

fn id_strings(events: &DataFrame, col: &str) -> anyhow::Result<Vec<Option<String>>> {
    let c = events.column(col)?.cast(&DataType::String)?;
    Ok(c.str()?.iter().map(|v| v.map(str::to_string)).collect())
}

/// Re-admits ids that arrived after `horizon_ms` (rebuilding the index after a restart).
fn admit_recent(
    d: &mut Dedupe,
    events: &DataFrame,
    id_col: &str,
    horizon_ms: i64,
) -> anyhow::Result<()> {
    let ids = id_strings(events, id_col)?;
    let arrivals = events.column(ARRIVAL_COLUMN)?.cast(&DataType::Int64)?;
    for (id, at) in ids.iter().zip(arrivals.i64()?.iter()) {
        if let (Some(id), Some(at)) = (id, at)
            && at > horizon_ms
        {
            d.admit(id.as_bytes(), at);
        }
    }
    Ok(())
}

/// Log record (version 2): `!arrival_ms` as i64 LE — negative, which tells it from a version 1
/// record, whose arrival time comes first as is —, a flags byte ([`HAS_HEADER`]), then for CSV
/// the length (u32 LE) and bytes of the request's header, then the event's record as the door
/// decoded it, line break included. Each record replays on its own: requests that arrived in the same millisecond,
/// with different headers, a byte order mark or records spanning lines, decode as they did.
fn encode_record(arrival_ms: i64, header: Option<&[u8]>, record: &[u8]) -> Vec<u8> {
    let header_len = header.map_or(0, |h| 4 + h.len());
    let mut r = Vec::with_capacity(9 + header_len + record.len());
    r.extend_from_slice(&(!arrival_ms).to_le_bytes());
    match header {
        Some(h) => {
            r.push(HAS_HEADER);
            // A header beyond 4 GiB cannot have passed the door's body limit.
            r.extend_from_slice(&u32::try_from(h.len()).unwrap_or(u32::MAX).to_le_bytes());
            r.extend_from_slice(h);
        }
        None => r.push(0),
    }
    r.extend_from_slice(record);
    r
}

/// Flag of a version 2 log record: a CSV header precedes the record.
const HAS_HEADER: u8 = 1;

/// A log record, parsed.
#[derive(PartialEq)]
enum LogRecord<'a> {
    /// Version 1 (before requests were kept apart): the event's line, for CSV prefixed with
    /// the header and a newline.
    V1 { arrival: i64, line: &'a [u8] },
    V2 {
        arrival: i64,
        header: Option<&'a [u8]>,
        record: &'a [u8],
    },
}

impl<'a> LogRecord<'a> {
    fn parse(offset: u64, bytes: &'a [u8]) -> anyhow::Result<LogRecord<'a>> {
        let bad = || anyhow::anyhow!("write-ahead log record {offset} is malformed");
        let head: [u8; 8] = bytes
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        let stamp = i64::from_le_bytes(head);
        if stamp >= 0 {
            return Ok(LogRecord::V1 {
                arrival: stamp,
                line: &bytes[8..],
            });
        }
        let flags = *bytes.get(8).ok_or_else(bad)?;
        let (header, rest) = if flags & HAS_HEADER != 0 {
            let len: [u8; 4] = bytes
                .get(9..13)
                .and_then(|l| l.try_into().ok())
                .ok_or_else(bad)?;
            let end = 13 + u32::from_le_bytes(len) as usize;
            (Some(bytes.get(13..end).ok_or_else(bad)?), &bytes[end..])
        } else {
            (None, &bytes[9..])
        };
        Ok(LogRecord::V2 {
            arrival: !stamp,
            header,
            record: rest,
        })
    }

    fn arrival(&self) -> i64 {
        match self {
            LogRecord::V1 { arrival, .. } | LogRecord::V2 { arrival, .. } => *arrival,
        }
    }

    /// Whether `other` decodes in one body with `self` (as the next record).
    fn joins(&self, other: &LogRecord) -> bool {
        match (self, other) {
            (LogRecord::V1 { arrival: a, .. }, LogRecord::V1 { arrival: b, .. }) => a == b,
            (
                LogRecord::V2 {
                    arrival: a,
                    header: h,
                    ..
                },
                LogRecord::V2 {
                    arrival: b,
                    header: g,
                    ..
                },
            ) => a == b && h == g,
            _ => false,
        }
    }
}

/// Decodes replayed log records back into events (with their original arrival times).
fn decode_records(plan: &Plan, records: &[(u64, Vec<u8>)]) -> anyhow::Result<DataFrame> {
    let csv = plan.pipeline().format == crate::spec::Format::Csv;
    let parsed: Vec<LogRecord> = records
        .iter()
        .map(|(offset, bytes)| LogRecord::parse(*offset, bytes))
        .collect::<anyhow::Result<_>>()?;
    let mut frames = Vec::new();
    // Runs of records that decode together: one body per run.
    let mut i = 0;
    while i < parsed.len() {
        let mut j = i + 1;
        while j < parsed.len() && parsed[i].joins(&parsed[j]) {
            j += 1;
        }
        let mut body = Vec::new();
        for (k, rec) in parsed[i..j].iter().enumerate() {
            match rec {
                LogRecord::V2 { header, record, .. } => {
                    if let (0, Some(h)) = (k, header) {
                        body.extend_from_slice(h);
                        body.push(b'\n');
                    }
                    // With its own line break (which the last one of a request may lack).
                    body.extend_from_slice(record);
                    if !record.ends_with(b"\n") {
                        body.push(b'\n');
                    }
                    continue;
                }
                // Version 1 records of one arrival time came from one request (as far as
                // that version knew); each CSV record carries its header: keep the first.
                LogRecord::V1 { line, .. } if csv && k > 0 => {
                    let data = line.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default();
                    body.extend_from_slice(data);
                }
                LogRecord::V1 { line, .. } => body.extend_from_slice(line),
            }
            body.push(b'\n');
        }
        let decoded = plan.decode_logged(&body);
        anyhow::ensure!(
            decoded.rejected.is_empty() && decoded.events.height() == j - i,
            "write-ahead log records {}..{} no longer decode ({} rejected); was the pipeline schema changed?",
            records[i].0,
            records[j - 1].0 + 1,
            decoded.rejected.len()
        );
        frames.push(with_positions(
            decoded.events,
            records[i].0..records[j - 1].0 + 1,
            parsed[i].arrival(),
        )?);
        i = j;
    }
    // Positions are re-added by the aggregator.
    Ok(concat_frames(frames)?.drop_many([OFFSET_COLUMN]))
}

/// A log directory that has lost its files (or is new) must continue at the checkpoint, so
/// positions are never reused.
fn ensure_log_starts_at(dir: &Path, checkpoint: u64) -> anyhow::Result<()> {
    crate::fsync::create_dir_all(dir)?;
    let has_files = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .any(|e| e.path().extension().is_some_and(|x| x == "wal"));
    if !has_files && checkpoint > 0 {
        // Durable, entry included: a crash must not lose the marker and restart at 0.
        crate::fsync::create_file(&dir.join(format!("{checkpoint:020}.wal")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(format: &str, segment_age: &str) -> String {
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
views:
  - name: overall
    window: all
    metrics:
      n: count()
      total: sum(amount)
"#
        )
    }

    /// A project directory with its state DB, lake and log, and runtimes started on them.
    struct Project {
        dir: tempfile::TempDir,
        pipeline: Arc<Pipeline>,
        plan: Arc<Plan>,
        db: State,
        lake: Lake,
        shutdown: CancellationToken,
    }

    impl Project {
        async fn new(spec: &str) -> Project {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
            std::fs::write(dir.path().join("pipelines/orders.yaml"), spec).unwrap();
            let project = crate::spec::load(dir.path()).expect("valid spec");
            let pipeline = Arc::new(project.pipeline("orders").unwrap().clone());
            let plan = Arc::new(Plan::compile(&pipeline).unwrap());
            let url = format!("sqlite://{}", dir.path().join("state.db").display());
            let db = State::open(&url).await.unwrap();
            let lake_dir = dir.path().join("lake");
            let lake =
                Lake::open(&format!("file://{}", lake_dir.display()), &BTreeMap::new()).unwrap();
            Project {
                dir,
                pipeline,
                plan,
                db,
                lake,
                shutdown: CancellationToken::new(),
            }
        }

        async fn start(&mut self) -> Arc<PipelineRuntime> {
            self.shutdown.cancel();
            self.shutdown = CancellationToken::new();
            PipelineRuntime::start(
                self.pipeline.clone(),
                self.plan.clone(),
                self.db.clone(),
                self.lake.clone(),
                &self.dir.path().join("log"),
                self.shutdown.clone(),
            )
            .await
            .unwrap()
        }
    }

    /// `(n, total)` of the `overall` view as the speed layer holds it (these tests publish
    /// no batch view): its partials merged and finished by the plan.
    fn served(rt: &PipelineRuntime) -> (u64, f64) {
        let snap = rt.snapshot(0);
        if snap.speed.is_empty() {
            return (0, 0.0);
        }
        let merged = rt.plan.merge(0, snap.speed).unwrap();
        let answer = rt.plan.finish(0, merged).unwrap();
        let n = answer.column("n").unwrap().cast(&DataType::UInt64).unwrap();
        let total = answer.column("total").unwrap().cast(&DataType::Float64).unwrap();
        (
            n.u64().unwrap().get(0).unwrap_or(0),
            total.f64().unwrap().get(0).unwrap_or(0.0),
        )
    }

    async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !done().await {
            assert!(start.elapsed() < Duration::from_secs(15), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ndjson(amounts: &[f64]) -> Bytes {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_micro_batch_is_rebuilt_from_the_log_never_sealed_short() {
        let mut p = Project::new(&spec("json", "300ms")).await;
        let rt = p.start().await;
        // The plan fails on the next micro-batch (the first request's).
        rt.fail_applies.store(1, Ordering::SeqCst);
        assert_eq!(
            rt.ingest(ndjson(&[1.0, 2.0, 3.0])).await.unwrap().accepted,
            3
        );
        assert_eq!(rt.ingest(ndjson(&[10.0, 20.0])).await.unwrap().accepted, 2);
        wait_for("the open segment sealed", async || {
            p.db.checkpoint("orders", 0).await.unwrap() == Some(5)
        })
        .await;
        // Every acknowledged event is counted and archived: the failed micro-batch was
        // absorbed again from the log, and no segment lacks rows.
        assert_eq!(served(&rt), (5, 36.0));
        let segments = p.db.segments("orders").await.unwrap();
        for s in &segments {
            assert_eq!(s.rows, s.hi - s.lo, "{s:?}");
        }
        assert_eq!(segments.iter().map(|s| s.rows).sum::<u64>(), 5);

        // The same after a restart, from the archive.
        let rt = p.start().await;
        assert_eq!(served(&rt), (5, 36.0));
        p.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_rebuilding_fails_nothing_is_sealed_and_then_everything_is() {
        let mut p = Project::new(&spec("json", "200ms")).await;
        let rt = p.start().await;
        // The micro-batch and the first rebuild fail: the aggregator waits (back-off) and
        // seals nothing meanwhile, then rebuilds.
        rt.fail_applies.store(2, Ordering::SeqCst);
        rt.ingest(ndjson(&[1.0, 2.0])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(p.db.checkpoint("orders", 0).await.unwrap(), None);
        assert_eq!(
            served(&rt),
            (0, 0.0),
            "nothing served from a failed micro-batch"
        );
        rt.ingest(ndjson(&[4.0])).await.unwrap();
        wait_for("everything sealed after the rebuild", async || {
            p.db.checkpoint("orders", 0).await.unwrap() == Some(3)
        })
        .await;
        assert_eq!(served(&rt), (3, 7.0));
        p.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn csv_records_spanning_lines_and_unterminated_quotes_are_logged_and_replayed() {
        let mut p = Project::new(&spec("csv", "1h")).await;
        let rt = p.start().await;
        let body = "ts,country,amount\n1700000000000,\"D\nE\",1.5\n1700000000001,US,2\n";
        let r = rt.ingest(Bytes::from(body)).await.unwrap();
        assert_eq!((r.accepted, r.rejected), (2, 0));
        // An unterminated quote rejects its own record; the rest of the request counts.
        let body = "\u{feff}amount,ts,country\n4,1700000000002,\"FR\n8,1700000000003,JP\r\n16,1700000000004,IT\n";
        let r = rt.ingest(Bytes::from(body)).await.unwrap();
        assert_eq!((r.accepted, r.rejected), (2, 1), "{r:?}");
        assert_eq!(r.errors[0].line, 2);
        assert_eq!(r.errors[0].reason, "unterminated quoted field");
        wait_for("absorbed", async || served(&rt).0 == 4).await;
        assert_eq!(served(&rt), (4, 27.5));
        // Replayed from the log after a restart: the same events.
        let rt = p.start().await;
        wait_for("replayed", async || served(&rt).0 == 4).await;
        assert_eq!(served(&rt), (4, 27.5));
        p.shutdown.cancel();
    }

    /// The log records the door writes for `body`.
    fn door_records(plan: &Plan, arrival: i64, body: &[u8]) -> Vec<Vec<u8>> {
        let d = plan.decode(body);
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        let header = d.header.clone().map(|h| &body[h]);
        d.records
            .iter()
            .map(|r| encode_record(arrival, header, &body[r.clone()]))
            .collect()
    }

    fn replay(plan: &Plan, records: Vec<Vec<u8>>) -> DataFrame {
        let records: Vec<(u64, Vec<u8>)> = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect();
        decode_records(plan, &records).unwrap()
    }

    #[tokio::test]
    async fn requests_of_one_millisecond_replay_as_each_was_decoded() {
        let csv = Project::new(&spec("csv", "1h")).await;
        let arrival = 1_700_000_000_000;
        // Two requests, one millisecond, different headers; the second with a byte order mark.
        let a = "ts,country,amount\n1,DE,1.5\n2,\"U\nS\",2\n";
        let b = "\u{feff}amount,ts,country\n4,3,FR\r\r\n8,4,JP";
        let mut records = door_records(&csv.plan, arrival, a.as_bytes());
        records.extend(door_records(&csv.plan, arrival, b.as_bytes()));
        let events = replay(&csv.plan, records);
        let amounts: Vec<Option<f64>> = events
            .column("amount")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(amounts, [Some(1.5), Some(2.0), Some(4.0), Some(8.0)]);
        let countries: Vec<Option<&str>> = events
            .column("country")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .collect();
        // Exactly as the door read them: a value spanning lines, a carriage return kept.
        assert_eq!(
            countries,
            [Some("DE"), Some("U\nS"), Some("FR\r"), Some("JP")]
        );

        let json = Project::new(&spec("json", "1h")).await;
        let a = "{\"ts\": 1, \"country\": \"DE\", \"amount\": 1}\n";
        let b = "\u{feff}{\"ts\": 2, \"country\": \"US\", \"amount\": 2}\n";
        let mut records = door_records(&json.plan, arrival, a.as_bytes());
        records.extend(door_records(&json.plan, arrival, b.as_bytes()));
        assert_eq!(replay(&json.plan, records).height(), 2);
    }

    #[tokio::test]
    async fn version_1_log_records_still_replay() {
        let p = Project::new(&spec("csv", "1h")).await;
        let v1 = |arrival: i64, line: &str| {
            let mut r = arrival.to_le_bytes().to_vec();
            r.extend_from_slice(line.as_bytes());
            r
        };
        let records = vec![
            v1(5, "ts,country,amount\n1,DE,1"),
            v1(5, "ts,country,amount\n2,US,2"),
            v1(6, "amount,ts,country\n4,3,FR"),
        ];
        let events = replay(&p.plan, records);
        let amounts: Vec<Option<f64>> = events
            .column("amount")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(amounts, [Some(1.0), Some(2.0), Some(4.0)]);
        let arrivals = events
            .column(ARRIVAL_COLUMN)
            .unwrap()
            .cast(&DataType::Int64)
            .unwrap();
        let arrivals: Vec<Option<i64>> = arrivals.i64().unwrap().iter().collect();
        assert_eq!(arrivals, [Some(5), Some(5), Some(6)]);
    }

    #[tokio::test]
    async fn the_log_start_marker_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let log_dir = root.join("log/orders/p=0");
        ensure_log_starts_at(&log_dir, 42).unwrap();
        let marker = log_dir.join(format!("{:020}.wal", 42));
        assert!(marker.is_file());
        let synced = crate::fsync::synced_under(&root);
        for p in [
            &marker,
            &log_dir,
            &root.join("log/orders"),
            &root.join("log"),
            &root,
        ] {
            assert!(synced.contains(p), "{} not synced: {synced:?}", p.display());
        }
    }
}
