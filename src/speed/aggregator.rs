//! The aggregator and archiver: one task per partition of a pipeline that absorbs durable
//! micro-batches through the plan into partials of the partition's open segment, and seals the
//! open segment — a Parquet file in the lake, then its manifest row and checkpoint in one state
//! transaction — once it is old or big enough.
//!
//! Fail closed: a micro-batch is absorbed whole or not at all, and the open segment only grows
//! when it is. When one fails, the aggregator absorbs nothing more and rebuilds the open segment
//! from the write-ahead log (retrying with back-off); no segment is sealed meanwhile, and a
//! segment is sealed only if it holds exactly one row per position.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use polars::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::log;
use super::record::{
    ARRIVAL_COLUMN, OFFSET_COLUMN, concat_frames, decode_records, time_range, with_positions,
};
use super::runtime::{Batch, Command, Lane, OpenPartials, PipelineRuntime};
use crate::clock::now_ms;
use crate::lake;
use crate::plan::{LookupSet, Plan, Restating, json};
use crate::state::{Cause, Fence, LedgerEntry, Segment, StateError};

/// Longest wait between attempts to rebuild the open segment after a failure.
const MAX_REBUILD_BACKOFF: Duration = Duration::from_secs(30);

/// The aggregator/archiver task state: the open segment of a partition.
pub(super) struct Aggregator {
    rt: Arc<PipelineRuntime>,
    /// Its partition's index in [`PipelineRuntime::lanes`], and the partition.
    lane: usize,
    partition: u32,
    /// First position of the open segment.
    lo: u64,
    /// Next position expected (= end of the open segment so far): every position in
    /// `[lo, next)` is absorbed, and nothing else.
    next: u64,
    /// End of the positions ever absorbed: a rebuild absorbs those below it again, which
    /// does not move the instant the state stands for ([`crate::clock::Tick`]) again.
    high: u64,
    /// Raw events of the open segment, for its Parquet file.
    events: Vec<DataFrame>,
    rows: u64,
    opened: Option<Instant>,
    /// Set when a micro-batch failed: nothing is absorbed or sealed until the open segment is
    /// rebuilt from the log, which is next tried at this instant.
    rebuild_at: Option<Instant>,
    /// Failed attempts in a row (for the back-off).
    failures: u32,
    /// The lookup versions the open segment is enriched with: taken when it opens, recorded
    /// with it when it is sealed, so every event of a segment is enriched alike.
    lookups: LookupSet,
    /// Whether this process runs the partition: always, except on a node
    /// (`serve --node`), where it runs those it holds the lease of — at `fence`, which every
    /// seal carries (a node that lost the lease cannot record a segment).
    owned: bool,
    fence: Option<Fence>,
}

impl Aggregator {
    pub(super) fn new(rt: Arc<PipelineRuntime>, lane: usize, checkpoint: u64) -> Self {
        Aggregator {
            lookups: rt.lookups.current(),
            partition: rt.lanes[lane].partition,
            owned: rt.node().is_none(),
            fence: None,
            lane,
            rt,
            lo: checkpoint,
            next: checkpoint,
            high: checkpoint,
            events: Vec::new(),
            rows: 0,
            opened: None,
            rebuild_at: None,
            failures: 0,
        }
    }

    fn lane(&self) -> &Lane {
        &self.rt.lanes[self.lane]
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<log::Durable<Batch>>,
        mut commands: mpsc::Receiver<Command>,
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
                Some(command) = commands.recv() => {
                    let pause = match command {
                        Command::Pause(pause) => pause,
                        Command::Own { checkpoint, fence, reply } => {
                            let _ = reply.send(self.own(checkpoint, fence, &mut rx).await);
                            continue;
                        }
                        Command::Disown { seal, reply } => {
                            let _ = reply.send(self.disown(seal, &mut rx).await);
                            continue;
                        }
                    };
                    let open = self.open_partials(&pause.plan).await;
                    if let Err(e) = &open {
                        tracing::warn!(pipeline = %self.rt.pipeline.name, partition = self.partition, error = %format!("{e:#}"), "switching the definition failed; the pipeline runs the one it ran");
                    }
                    let paused = open.is_ok();
                    let _ = pause.reply.send(open);
                    if paused {
                        // Until the switch is installed or abandoned, or the server stops.
                        tokio::select! {
                            _ = pause.resume => {}
                            _ = shutdown.cancelled() => break,
                        }
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
            if self.owned && self.rebuild_at.is_none() && self.should_seal() {
                self.try_seal(&mut rx).await;
            }
        }
    }

    /// Seals the open segment, which must hold one event per position; a failure is retried
    /// by the next attempt — except a lost lease: the partition is given up at once.
    async fn try_seal(&mut self, rx: &mut mpsc::Receiver<log::Durable<Batch>>) {
        if self.rows != self.next - self.lo {
            let e = anyhow::anyhow!(
                "the open segment holds {} events for positions {}..{}",
                self.rows,
                self.lo,
                self.next
            );
            self.fail(e, "refusing to seal an incomplete segment");
            return;
        }
        let Err(e) = self.seal().await else { return };
        let fenced = e
            .chain()
            .any(|c| matches!(c.downcast_ref(), Some(StateError::Fenced { .. })));
        if !fenced {
            tracing::error!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "sealing segment failed; will retry");
            return;
        }
        tracing::warn!(pipeline = %self.rt.pipeline.name, partition = self.partition, error = %format!("{e:#}"), "partition lost to another node; dropping what it did not seal");
        self.rt.lost(self.partition);
        if let Err(e) = self.disown(false, rx).await {
            tracing::error!(pipeline = %self.rt.pipeline.name, partition = self.partition, error = %format!("{e:#}"), "giving up the partition failed");
        }
    }

    /// [`Command::Own`]: the partition's log and open segment start over at `checkpoint`.
    async fn own(
        &mut self,
        checkpoint: u64,
        fence: Fence,
        rx: &mut mpsc::Receiver<log::Durable<Batch>>,
    ) -> anyhow::Result<()> {
        self.start_over(checkpoint, rx).await?;
        self.owned = true;
        self.fence = Some(fence);
        Ok(())
    }

    /// [`Command::Disown`]: seals the open segment when `seal` and it can, then drops what is
    /// not sealed.
    async fn disown(
        &mut self,
        seal: bool,
        rx: &mut mpsc::Receiver<log::Durable<Batch>>,
    ) -> anyhow::Result<()> {
        if seal
            && self.owned
            && self.rebuild_at.is_none()
            && self.next > self.lo
            && let Err(e) = self.seal().await
        {
            tracing::warn!(pipeline = %self.rt.pipeline.name, partition = self.partition, error = %format!("{e:#}"), "sealing before handing the partition over failed; the next node reads its events from the broker");
        }
        self.owned = false;
        self.fence = None;
        self.start_over(self.lo, rx).await
    }

    /// Forgets the open segment and empties the log, continuing at position `to`: what they
    /// held is not archived, so its ids leave the de-duplication index (the broker delivers
    /// those events again, to whichever node runs the partition).
    async fn start_over(
        &mut self,
        to: u64,
        rx: &mut mpsc::Receiver<log::Durable<Batch>>,
    ) -> anyhow::Result<()> {
        let rt = self.rt.clone();
        let log = self.lane().log.clone();
        let reset = log.reset(self.lo, to);
        tokio::pin!(reset);
        // The log's writer may be handing micro-batches over meanwhile: they are given up too.
        let given_up = loop {
            tokio::select! {
                r = &mut reset => break r?,
                Some(_) = rx.recv() => {}
            }
        };
        while rx.try_recv().is_ok() {}
        {
            let mut st = rt.state.write();
            st.discard_open_of(self.partition);
            st.absorbed.insert(self.partition, to);
        }
        self.lo = to;
        self.next = to;
        self.high = to;
        self.events.clear();
        self.rows = 0;
        self.opened = None;
        self.rebuild_at = None;
        self.failures = 0;
        self.lookups = rt.lookups.current();
        let lane = self.lane();
        lane.open_rows.store(0, Ordering::Relaxed);
        lane.open_since_ms.store(0, Ordering::Relaxed);
        lane.logged_end.store(to, Ordering::Release);
        lane.marks.lock().clear();
        lane.changes.fetch_add(1, Ordering::Release);
        let index = self.lane;
        rt.sealed_end.send_modify(|ends| ends[index] = to);
        if let (Some(d), Some(column), false) =
            (&rt.dedupe, &rt.pipeline.event_id, given_up.is_empty())
        {
            let plan = rt.plan();
            let events =
                tokio::task::spawn_blocking(move || decode_records(&plan, &given_up)).await??;
            let ids = super::door::id_strings(&events, column)?;
            let mut d = d.lock();
            for id in ids.iter().flatten() {
                d.forget(id.as_bytes());
            }
        }
        Ok(())
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
        {
            let mut st = rt.state.write();
            st.discard_open(self.partition, self.lo);
            st.absorbed.insert(self.partition, self.lo);
        }
        self.lane().changes.fetch_add(1, Ordering::Release);
        self.next = self.lo;
        self.events.clear();
        self.rows = 0;
        self.opened = None;
        self.lane().open_rows.store(0, Ordering::Relaxed);
        self.lane().open_since_ms.store(0, Ordering::Relaxed);
        let log = &self.lane().log;
        let (lo, end) = (self.lo, log.durable_end());
        if end <= lo {
            return Ok(());
        }
        let dir = log.dir().to_path_buf();
        let plan = rt.plan();
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
            0,
            Batch {
                events,
                acked: None,
            },
        )])
        .await
    }

    /// For a switch of the definition ([`PipelineRuntime::switch`]): the open segment's
    /// partials by `plan`, computed from the events it holds.
    async fn open_partials(&self, plan: &Arc<Plan>) -> anyhow::Result<Option<OpenPartials>> {
        anyhow::ensure!(
            self.rebuild_at.is_none(),
            "the speed layer is rebuilding an open segment after a failure (see the server's log); promote again once it has"
        );
        if self.rows == 0 {
            return Ok(None);
        }
        let (frames, lookups, p) = (self.events.clone(), self.lookups.clone(), plan.clone());
        let parts = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok(p.partials_all(concat_frames(frames)?, &lookups)?)
        })
        .await??;
        Ok(Some(OpenPartials {
            partition: self.partition,
            lo: self.lo,
            hi: self.next,
            rows: self.rows,
            parts,
        }))
    }

    /// Absorbs the open segment replayed from the log at start (before the task runs); when
    /// that fails, the task rebuilds it from the log as after any failed micro-batch.
    pub(super) async fn absorb_replayed(&mut self, replayed: log::Durable<Batch>) {
        if let Err(e) = self.apply(vec![replayed]).await {
            self.fail(
                e,
                "speed layer failed to absorb the replayed write-ahead log",
            );
        }
    }

    /// Absorbs durable requests into the open segment — all of them, or (on error) none.
    async fn apply(&mut self, batch: Vec<log::Durable<Batch>>) -> anyhow::Result<()> {
        let mut frames = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        // (events, fresh) per frame: replayed events were counted by the process that took them.
        let mut sizes = Vec::with_capacity(batch.len());
        let mut next = self.next;
        for (range, arrival_ms, b) in batch {
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
            frames.push(with_positions(b.events, range, arrival_ms)?);
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
        if self.next == self.lo {
            // A segment opens: it takes the newest lookup versions.
            self.lookups = self.rt.lookups.current();
            *self.lane().open_lookups.write() = self.lookups.clone();
        }
        let rt = self.rt.clone();
        let lookups = self.lookups.clone();
        let again = usize::try_from(self.high.saturating_sub(self.next)).unwrap_or(usize::MAX);
        let (events, parts, filtered, rejected, arrivals) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let events = concat_frames(frames)?;
                let arrivals = arrival_runs(&events, again)?;
                let masked = rt.plan().partials_masked(events.clone(), &lookups)?;
                // An event a lookup rejected is counted as rejected, not as filtered.
                let keep = match (&masked.filter, masked.rejected.is_empty()) {
                    (Some(f), false) => {
                        let mut k = f.fill_null_with_values(false)?;
                        for (_, missing) in &masked.rejected {
                            k = &k | missing;
                        }
                        Some(k)
                    }
                    (f, _) => f.clone(),
                };
                let filtered = dropped_fresh(keep.as_ref(), &sizes)?;
                let rejected = rejections(&rt, &events, &masked.rejected, &sizes)?;
                Ok((events, masked.parts, filtered, rejected, arrivals))
            })
            .await??;
        let rows = events.height() as u64;
        anyhow::ensure!(
            rows == next - self.next,
            "{rows} events for positions {}..{next}",
            self.next
        );
        {
            let mut st = self.rt.state.write();
            st.absorb(&self.rt.plan(), self.partition, self.lo, next, rows, parts)?;
            // The instant the state stands for moves past these events, in the same step.
            st.tick = arrivals
                .iter()
                .fold(st.tick, |t, &(ms, n)| t.after_events(ms, n));
            st.absorbed.insert(self.partition, next);
        }
        self.lane().changes.fetch_add(1, Ordering::Release);
        self.high = self.high.max(next);
        // Absorbed: only now does the open segment take the positions.
        self.next = next;
        if self.opened.is_none() {
            self.opened = Some(Instant::now());
            self.lane()
                .open_since_ms
                .store(now_ms() as u64, Ordering::Relaxed);
        }
        self.rows += rows;
        self.events.push(events);
        self.lane().open_rows.store(self.rows, Ordering::Relaxed);
        self.rt
            .counters
            .filtered
            .fetch_add(filtered, Ordering::Relaxed);
        if !rejected.is_empty() {
            self.dead_letter(rejected).await;
        }
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
        let lookups = self.lookups.clone();
        let partition = self.partition;
        let (bytes, rows, min_ms, max_ms, restated) = {
            let rt = rt.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut df = concat_frames(frames)?;
                let (min_ms, max_ms) = time_range(&df, &rt.pipeline.event_time)?;
                let restated = restated(&rt, partition, lo, hi, &df, &lookups)?;
                let mut buf = Vec::new();
                ParquetWriter::new(&mut buf)
                    .with_compression(ParquetCompression::Zstd(None))
                    .finish(&mut df)?;
                Ok((buf, df.height() as u64, min_ms, max_ms, restated))
            })
            .await??
        };
        anyhow::ensure!(
            rows == hi - lo,
            "segment {lo}..{hi} would hold {rows} events"
        );
        let path = match &self.fence {
            Some(f) => lake::leased_archive_path(&rt.pipeline.name, partition, lo, hi, f.epoch),
            None => lake::archive_path(&rt.pipeline.name, partition, lo, hi),
        };
        let size = bytes.len() as u64;
        let crc32 = crc32fast::hash(&bytes);
        rt.lake
            .put(&path, Bytes::from(bytes))
            .await
            .with_context(|| format!("writing segment {path}"))?;
        // The rejections since the last seal of any partition go with this one: taken at once,
        // so partitions sealing together never count one twice (and given back if the seal
        // is not recorded).
        let dead_letters = rt.counters.rejected_unsealed.swap(0, Ordering::AcqRel);
        let segment = Segment {
            pipeline: rt.pipeline.name.clone(),
            partition,
            lo,
            hi,
            path: path.clone(),
            rows,
            bytes: size,
            dead_letters,
            min_event_ms: min_ms,
            max_event_ms: max_ms,
            lookups: self.lookups.record(),
            crc32: Some(crc32),
        };
        let offsets = self.lane().offsets_below(hi);
        let recorded = rt
            .db
            .seal_segment_fenced(&segment, &restated, self.fence.as_ref(), &offsets)
            .await;
        if recorded.is_err() {
            rt.counters
                .rejected_unsealed
                .fetch_add(dead_letters, Ordering::AcqRel);
        }
        recorded.with_context(|| format!("recording segment {path}"))?;
        self.lane().marks.lock().retain(|(end, _)| *end > hi);
        rt.state.write().seal(partition, lo, hi);
        self.lane().changes.fetch_add(1, Ordering::Release);
        let lane = self.lane;
        rt.sealed_end.send_modify(|ends| ends[lane] = hi);
        if let Err(e) = self.lane().log.truncate_below(hi) {
            tracing::warn!(pipeline = %rt.pipeline.name, partition, error = %e, "could not truncate the write-ahead log");
        }
        tracing::info!(pipeline = %rt.pipeline.name, segment = %path, rows, "sealed segment");
        rt.counters.sealed_segments.fetch_add(1, Ordering::Relaxed);
        self.lane().open_rows.store(0, Ordering::Relaxed);
        self.lane().open_since_ms.store(0, Ordering::Relaxed);
        self.lo = hi;
        self.events.clear();
        self.rows = 0;
        self.opened = None;
        self.lookups = rt.lookups.current();
        Ok(())
    }

    /// Writes the fresh events a lookup rejected to the dead-letter area (each with its
    /// position and the reason) and counts them. They stay in the archive — a recompute with
    /// a table that has their key (`run --refresh-lookups`) counts them — so a dead letter
    /// that cannot be written is logged, not retried: the micro-batch is absorbed.
    async fn dead_letter(&self, rejected: Vec<String>) {
        let n = rejected.len() as u64;
        self.rt.counters.rejected.fetch_add(n, Ordering::Relaxed);
        self.rt
            .counters
            .rejected_unsealed
            .fetch_add(n, Ordering::Relaxed);
        let at = now_ms();
        let mut body = String::new();
        for line in rejected {
            body.push_str(&line);
            body.push('\n');
        }
        let unique = format!(
            "lookup-{}-p{}-{}",
            std::process::id(),
            self.partition,
            self.next
        );
        let path = lake::dead_letter_path(&self.rt.pipeline.name, at, &unique);
        if let Err(e) = self.rt.lake.put(&path, Bytes::from(body)).await {
            tracing::error!(pipeline = %self.rt.pipeline.name, error = %e, rejected = n, "cannot write the dead letters of events a lookup rejected");
        }
    }
}

/// The restatement ledger's entries for segment `[lo, hi)` of `events`: per view whose windows
/// end, the windows and groups its late events changed, compared with what the view serves now
/// (the segment's partials absorbed, nothing newer: the aggregator seals before it absorbs).
fn restated(
    rt: &PipelineRuntime,
    partition: u32,
    lo: u64,
    hi: u64,
    events: &DataFrame,
    lookups: &LookupSet,
) -> anyhow::Result<Vec<LedgerEntry>> {
    let mut out = Vec::new();
    let at = now_ms();
    let plan = rt.plan();
    for (v, view) in plan.pipeline().views.iter().enumerate() {
        if !plan.has_window_ends(v) {
            continue;
        }
        let (others, own, horizon_ms) = rt.state.read().around(v, partition, lo);
        let served = Restating {
            others: &others,
            own: &own,
            horizon_ms,
        };
        let rows = anyhow::Context::with_context(
            plan.restated(v, events, ARRIVAL_COLUMN, lookups, &served),
            || format!("finding what late events restated in view `{}`", view.name),
        )?;
        let cause = Cause::Late { partition, lo, hi };
        let names = (rt.pipeline.name.as_str(), view.name.as_str());
        out.extend(
            rows.into_iter()
                .map(|r| LedgerEntry::of(names, cause, r, at)),
        );
    }
    Ok(out)
}

/// The dead-letter lines (JSON) of the fresh events that a lookup with `on_missing: reject`
/// has no row for: position, reason, the event's values and when it arrived.
fn rejections(
    rt: &PipelineRuntime,
    events: &DataFrame,
    rejected: &[(String, BooleanChunked)],
    frames: &[(u64, bool)],
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    if rejected.is_empty() {
        return Ok(out);
    }
    let p = &rt.pipeline;
    let offsets = events.column(OFFSET_COLUMN)?.cast(&DataType::Int64)?;
    let offsets = offsets.i64()?;
    let arrivals = events.column(ARRIVAL_COLUMN)?.cast(&DataType::Int64)?;
    let arrivals = arrivals.i64()?;
    let mut start = 0usize;
    for &(n, fresh) in frames {
        let n = usize::try_from(n)?;
        for row in start..start + if fresh { n } else { 0 } {
            let Some((name, _)) = rejected
                .iter()
                .find(|(_, missing)| missing.get(row) == Some(true))
            else {
                continue;
            };
            let lookup = p
                .lookups
                .iter()
                .find(|l| &l.name == name)
                .context("a rejecting lookup of the pipeline")?;
            let mut event = serde_json::Map::new();
            for (column, _) in &p.schema {
                let v = events.column(column)?.get(row)?;
                event.insert(column.clone(), json(&v));
            }
            let key = event.get(&lookup.on).cloned().unwrap_or_default();
            let rec = serde_json::json!({
                "position": offsets.get(row),
                "reason": format!("no row of lookup `{name}` for `{}` = {key} (on_missing: reject)", lookup.on),
                "event": event,
                "received_at": arrivals.get(row).map(crate::clock::format_ms),
            });
            out.push(rec.to_string());
        }
        start += n;
    }
    Ok(out)
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

/// The events' arrival times (epoch ms) in position order, as runs of (time, events), but for
/// the first `skip` events (absorbed before: a rebuild).
fn arrival_runs(events: &DataFrame, skip: usize) -> anyhow::Result<Vec<(i64, i64)>> {
    let arrivals = events.column(ARRIVAL_COLUMN)?.cast(&DataType::Int64)?;
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for ms in arrivals.i64()?.iter().skip(skip) {
        let ms = ms.context("an event without an arrival time")?;
        match runs.last_mut() {
            Some((last, n)) if *last == ms => *n += 1,
            _ => runs.push((ms, 1)),
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use crate::speed::testing::{Project, ndjson, served, spec, wait_for};

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
    async fn a_rebuild_does_not_count_events_absorbed_before_again() {
        let mut p = Project::new(&spec("json", "1h")).await;
        let rt = p.start().await;
        // Both requests are stamped in one millisecond (the clock is a minute ahead).
        let ms = crate::clock::now_ms() + 60_000;
        rt.stamps.restart(ms, &rt.logged_end());
        rt.ingest(ndjson(&[1.0, 2.0, 3.0])).await.unwrap();
        wait_for("absorbed", async || served(&rt).0 == 3).await;
        assert_eq!(rt.tick(), crate::clock::Tick { ms, n: 3 });
        // The next micro-batch fails: the open segment is rebuilt, the first three again.
        rt.fail_applies.store(1, Ordering::SeqCst);
        rt.ingest(ndjson(&[10.0, 20.0])).await.unwrap();
        wait_for("rebuilt", async || served(&rt).0 == 5).await;
        assert_eq!(rt.tick(), crate::clock::Tick { ms, n: 5 });
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
}
