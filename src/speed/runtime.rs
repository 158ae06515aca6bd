//! One pipeline's speed layer: the door (decode → dead letters → de-duplicate → write-ahead
//! log), the aggregator (micro-batches through the plan into partials of the open segment) and
//! the archiver (seal the open segment into a Parquet file in the lake + manifest row and
//! checkpoint in one state transaction). Recovery at start rebuilds partials of uncovered sealed
//! segments from their Parquet files and replays the open segment from the log.
//!
//! Position-less sources (HTTP, generator, file) use partition 0 of the pipeline's own log.

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
use super::partials::SpeedState;
use crate::batch::maintenance;
use crate::lake::{self, Lake};
use crate::plan::{Decoded, Plan};
use crate::serving::query::AnswerCache;
use crate::serving::time::now_ms;
use crate::sources::status::SourceStatus;
use crate::spec::Pipeline;
use crate::state::{Segment, State};
use crate::telemetry::{Histogram, LATENCY_BUCKETS, RateMeter};

/// The partition of the pipeline's own write-ahead log.
const LOG_PARTITION: u32 = 0;
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
    pub state: Arc<RwLock<SpeedState>>,
    pub counters: Arc<Counters>,
    /// The serving layer's finished answers per view, valid while the state's version holds.
    pub answers: AnswerCache,
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
        let covered =
            maintenance::covered_where(&db, &pipeline, |v, p| p.logic_hash == plan.logic_hash(v))
                .await?;
        let sealed_at = match (&covered, &dedupe) {
            (Some(_), Some(_)) => db.sealed_at(&name).await?,
            _ => Default::default(),
        };
        let mut skipped = 0usize;
        for seg in &segments {
            let is_covered = covered
                .as_ref()
                .is_some_and(|c| maintenance::is_covered(c, seg));
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
        let (tx, rx) = mpsc::unbounded_channel();
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
            let _ = tx.send((
                first..last,
                Batch {
                    events,
                    arrival_ms: now_ms(),
                    acked: None,
                },
            ));
        }
        drop(tx);

        let rt = Arc::new(PipelineRuntime {
            pipeline: pipeline.clone(),
            plan: plan.clone(),
            state: speed,
            counters,
            answers: AnswerCache::new(views),
            source_status: Arc::new(SourceStatus::default()),
            log,
            logged_end: AtomicU64::new(next),
            sealed_end: watch::Sender::new(checkpoint),
            dedupe,
            lake,
            db,
        });
        let aggregator = Aggregator::new(rt.clone(), checkpoint);
        tokio::spawn(aggregator.run(rx, shutdown));
        Ok(rt)
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
            rejected,
        } = decoded;
        let mut lines = accepted_lines(
            &body,
            &rejected,
            self.pipeline.format == crate::spec::Format::Csv,
        );
        anyhow::ensure!(
            lines.len() == events.height(),
            "decoder returned {} events for {} accepted lines",
            events.height(),
            lines.len()
        );

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
                lines.retain(|_| *it.next().unwrap_or(&true));
                report.duplicates = dups;
                self.counters.duplicates.fetch_add(dups, Ordering::Relaxed);
            }
        }
        if events.height() == 0 {
            return Ok(report);
        }
        let records: Vec<Vec<u8>> = lines.iter().map(|l| encode_record(arrival, l)).collect();
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
            let rec = serde_json::json!({"line": r.line, "reason": r.reason, "raw": r.raw, "received_at": crate::serving::time::format_ms(arrival)});
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
    /// Next position expected (= end of the open segment so far).
    next: u64,
    /// Raw events of the open segment, for its Parquet file.
    events: Vec<DataFrame>,
    rows: u64,
    opened: Option<Instant>,
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
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<log::Durable<Batch>>,
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
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                        if batch.len() >= 1024 { break; }
                    }
                    if let Err(e) = self.apply(batch).await {
                        tracing::error!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "speed layer failed to apply a micro-batch");
                    }
                }
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            let accepted = self.rt.counters.accepted.load(Ordering::Relaxed);
            self.rt
                .counters
                .ingest_rate
                .lock()
                .record(accepted, Instant::now());
            if self.should_seal()
                && let Err(e) = self.seal().await
            {
                tracing::error!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "sealing segment failed; will retry");
            }
        }
    }

    async fn apply(&mut self, batch: Vec<log::Durable<Batch>>) -> anyhow::Result<()> {
        let mut frames = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        // (events, fresh) per frame: replayed events were counted by the process that took them.
        let mut sizes = Vec::with_capacity(batch.len());
        for (range, b) in batch {
            sizes.push((range.end - range.start, b.acked.is_some()));
            acks.extend(b.acked);
            anyhow::ensure!(
                range.start == self.next,
                "position gap: expected {}, got {}",
                self.next,
                range.start
            );
            self.next = range.end;
            frames.push(with_positions(b.events, range, b.arrival_ms)?);
        }
        let rt = self.rt.clone();
        let (events, parts, filtered) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let events = concat_frames(frames)?;
                let parts = partials_of(&rt.plan, &events)?;
                let filtered = filtered_of(&rt.plan, &events, &sizes)?;
                Ok((events, parts, filtered))
            })
            .await??;
        let rows = events.height() as u64;
        if self.opened.is_none() {
            self.opened = Some(Instant::now());
            self.rt
                .counters
                .open_since_ms
                .store(now_ms() as u64, Ordering::Relaxed);
        }
        self.rows += rows;
        self.events.push(events);
        self.rt.state.write().absorb(
            &self.rt.plan,
            LOG_PARTITION,
            self.lo,
            self.next,
            rows,
            parts,
        )?;
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
    let prepared = plan.prepare(events.clone().lazy());
    (0..plan.pipeline().views.len())
        .map(|i| {
            plan.partials(i, prepared.clone())
                .collect()
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// How many fresh events of `events` the pipeline's filter drops; `frames` gives the (events,
/// fresh) of the frames `events` stacks, in order.
fn filtered_of(plan: &Plan, events: &DataFrame, frames: &[(u64, bool)]) -> anyhow::Result<u64> {
    let Some(keep) = plan.filter_mask(events)? else {
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

/// Log record: arrival time (ms, LE) then the event's source line (for CSV: header, newline, line).
fn encode_record(arrival_ms: i64, line: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(8 + line.len());
    r.extend_from_slice(&arrival_ms.to_le_bytes());
    r.extend_from_slice(line);
    r
}

/// Decodes replayed log records back into events (with their original arrival times).
fn decode_records(plan: &Plan, records: &[(u64, Vec<u8>)]) -> anyhow::Result<DataFrame> {
    let csv = plan.pipeline().format == crate::spec::Format::Csv;
    let mut frames = Vec::new();
    // Consecutive records with the same arrival time came from one request: decode together.
    let mut i = 0;
    while i < records.len() {
        let head: [u8; 8] = records[i]
            .1
            .get(..8)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("log record {} is too short", records[i].0))?;
        let arrival = i64::from_le_bytes(head);
        let mut j = i;
        let mut body = Vec::new();
        while j < records.len()
            && records[j].1.len() >= 8
            && records[j].1[..8] == arrival.to_le_bytes()
        {
            let line = &records[j].1[8..];
            if csv && j > i {
                // Each CSV record carries its header; keep only the first.
                let data = line.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default();
                body.extend_from_slice(data);
            } else {
                body.extend_from_slice(line);
            }
            body.push(b'\n');
            j += 1;
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
            arrival,
        )?);
        i = j;
    }
    // Positions are re-added by the aggregator.
    Ok(concat_frames(frames)?.drop_many([OFFSET_COLUMN]))
}

/// The source lines of the accepted events, in order (for the log). Blank lines are skipped,
/// as the decoder skips them; for CSV each line is prefixed with the header.
fn accepted_lines(body: &[u8], rejected: &[crate::plan::Rejection], csv: bool) -> Vec<Vec<u8>> {
    let mut rejected_lines: Vec<usize> = rejected.iter().map(|r| r.line).collect();
    rejected_lines.sort_unstable();
    let mut out = Vec::new();
    let mut header: Option<&[u8]> = None;
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if csv && header.is_none() {
            header = Some(line);
            continue;
        }
        if rejected_lines.binary_search(&(i + 1)).is_ok() {
            continue;
        }
        match header {
            Some(h) => {
                let mut l = h.to_vec();
                l.push(b'\n');
                l.extend_from_slice(line);
                out.push(l);
            }
            None => out.push(line.to_vec()),
        }
    }
    out
}

/// A log directory that has lost its files (or is new) must continue at the checkpoint, so
/// positions are never reused.
fn ensure_log_starts_at(dir: &Path, checkpoint: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let has_files = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .any(|e| e.path().extension().is_some_and(|x| x == "wal"));
    if !has_files && checkpoint > 0 {
        std::fs::File::create(dir.join(format!("{checkpoint:020}.wal")))?;
    }
    Ok(())
}
