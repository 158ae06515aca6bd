//! One pipeline's speed layer, wired: the door ([`super::door`]: decode → dead letters →
//! de-duplicate → write-ahead log), the aggregator and archiver ([`super::aggregator`]:
//! micro-batches through the plan into partials of the open segment; seal it into a Parquet
//! file in the lake + manifest row and checkpoint in one state transaction), recovery at start
//! ([`super::recovery`]: partials of uncovered sealed segments from their Parquet files, the
//! open segment replayed from the log) and the log's records ([`super::record`]).
//!
//! Partitions: every source writes through the door into the pipeline's own write-ahead log,
//! one per partition (`partitions`, 1 by default); each partition has its own positions,
//! segments and checkpoint, and its own aggregator task ([`Lane`]). The door routes an event
//! by its key (`partition_key`, by default `event_id`), so every copy of an event lands in the
//! same partition; without one, a request goes whole to the next partition in turn.
//!
//! Bounded: the log hands durable events to the aggregator through a channel of
//! [`AGGREGATOR_QUEUE`] micro-batches; when the aggregator falls behind, the log's writer and
//! then the door wait.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use polars::prelude::*;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::aggregator::Aggregator;
use super::dedupe::Dedupe;
use super::log::{Log, Stamper};
use super::lookups::Lookups;
use super::partials::{BatchView, Snapshot, SpeedState};
use super::recovery;
use super::status::SourceStatus;
use crate::clock::{Stamps, Tick, now_ms};
use crate::lake::Lake;
use crate::plan::Plan;
use crate::spec::Pipeline;
use crate::state::{Fence, LedgerTotals, State, VerifyStatus};
use crate::telemetry::{Histogram, LATENCY_BUCKETS, RateMeter};

/// Durable requests waiting for the aggregator at most (see the module docs).
pub const AGGREGATOR_QUEUE: usize = 64;

/// Counters for `status` and `/metrics`.
pub struct Counters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    /// Accepted events the pipeline's `filter` dropped from every view (they are archived;
    /// replayed events are not counted again).
    pub filtered: AtomicU64,
    pub sealed_segments: AtomicU64,
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
            rejected_unsealed: AtomicU64::new(0),
            ack_to_visible: Histogram::new(LATENCY_BUCKETS),
            ingest_rate: Mutex::new(RateMeter::new(RATE_WINDOW)),
        }
    }
}

/// What a view serves after a switch of the definition ([`PipelineRuntime::switch`]).
pub enum Serve {
    /// The batch view it serves at the switch (its definition did not change).
    Keep,
    /// This batch view (or none: the speed layer alone), computed by the new definition.
    Batch(Option<BatchView>),
}

/// A switch of the definition pausing a partition's aggregator between two micro-batches
/// (see [`PipelineRuntime::switch`]): it answers with its open segment's partials by `plan`,
/// then absorbs and seals nothing until `resume` is sent or dropped.
pub(super) struct Pause {
    pub plan: Arc<Plan>,
    pub reply: oneshot::Sender<anyhow::Result<Option<OpenPartials>>>,
    pub resume: oneshot::Receiver<()>,
}

/// What a partition's aggregator is told between two micro-batches.
pub(super) enum Command {
    /// A switch of the definition (see [`Pause`]).
    Pause(Pause),
    /// This node now holds the partition's lease (`fence`): its write-ahead log and open
    /// segment start over at `checkpoint`, where the archive ends (see [`super::nodes`]).
    Own {
        checkpoint: u64,
        fence: Fence,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    /// This node gives the partition up: when `seal`, the open segment is sealed first (a
    /// graceful hand-over); then what is not sealed is dropped — the broker still has it.
    Disown {
        seal: bool,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// The open segment of a partition as a paused aggregator holds it, by a switch's definition.
pub(super) struct OpenPartials {
    pub partition: u32,
    pub lo: u64,
    pub hi: u64,
    pub rows: u64,
    pub parts: Vec<DataFrame>,
}

/// A partition's open segment as the node running it holds it, for other nodes to mirror
/// ([`PipelineRuntime::open_segment`], [`PipelineRuntime::mirror`]; on the wire:
/// [`super::nodes::encode_open`]).
pub struct OpenSegment {
    pub partition: u32,
    /// The lane's count of changes when taken: a mirror asks again with it.
    pub version: u64,
    /// Nothing changed since the version asked with: nothing else is filled in.
    pub unchanged: bool,
    /// Its positions `[lo, hi)` and their events (0: nothing open; `lo` is where the sealed
    /// segments end).
    pub lo: u64,
    pub hi: u64,
    pub rows: u64,
    /// The logic hash of each view whose partials these are.
    pub logic: Vec<String>,
    /// Per view: its partial frames.
    pub views: Vec<Vec<DataFrame>>,
    /// The definition that computed them (to merge them with), where they were taken.
    pub plan: Option<Arc<Plan>>,
}

/// One frame of `frames` (vertically stacked; partial frames of one view share a schema),
/// or an empty one.
fn concat_frames_or_empty(mut frames: Vec<DataFrame>) -> PolarsResult<DataFrame> {
    match frames.len() {
        0 => Ok(DataFrame::empty()),
        1 => Ok(frames.pop().expect("one")),
        _ => {
            let mut out = frames.remove(0);
            for f in &frames {
                out.vstack_mut(f)?;
            }
            Ok(out)
        }
    }
}

/// A switch of the definition, done.
pub struct Switched {
    /// The instant of the switch.
    pub at: Tick,
    /// The definition before it.
    pub old: Arc<Plan>,
    /// Per view of the old definition given a batch view: what it served just before and just
    /// after the switch (taken under the lock of the switch), to record what the new
    /// definition changed. (Views the switch added changed nothing served.)
    pub changed: Vec<(usize, Snapshot, Snapshot)>,
}

/// Decoded events travelling with their log records to the aggregator (their arrival time is
/// the one the log stamped them with, or for replayed events their `_arrival` column).
pub struct Batch {
    pub(super) events: DataFrame,
    /// Set by the door once the append is acknowledged; `None` for replayed events.
    pub(super) acked: Option<Arc<OnceLock<Instant>>>,
}

/// One partition of the pipeline's speed layer: its write-ahead log and what of it is durable;
/// its aggregator task absorbs and seals it.
pub struct Lane {
    pub partition: u32,
    pub(super) log: Log<Batch>,
    /// End (exclusive) of the write-ahead log: every position below it is durable.
    pub(super) logged_end: AtomicU64,
    /// Events of the open segment, and the arrival time of its first one (0 when empty).
    pub(super) open_rows: AtomicU64,
    pub(super) open_since_ms: AtomicU64,
    /// The lookup versions the open segment is enriched with (kept by the aggregator), for
    /// `as_of` answers that recompute it.
    pub(super) open_lookups: RwLock<crate::plan::LookupSet>,
    /// To the aggregator, between micro-batches: a switch's pause, a change of owner.
    commands: mpsc::Sender<Command>,
    /// Where a broker source resumes this partition: after a batch of its messages is logged
    /// up to `.0` (exclusive), the next offset of each of its broker partitions (`.1`). The
    /// seal of a segment ending at or after `.0` records them with it ([`Self::note_offsets`]).
    pub(super) marks: Mutex<Vec<(u64, BTreeMap<i32, i64>)>>,
    /// Bumped by every change of the open segment (absorb, seal, start over): other nodes
    /// mirror it only when it changed ([`PipelineRuntime::open_segment`]).
    pub(super) changes: AtomicU64,
}

impl Lane {
    /// End (exclusive) of the write-ahead log: positions below it are durable.
    pub fn logged_end(&self) -> u64 {
        self.logged_end.load(Ordering::Acquire)
    }

    /// Events of the open segment.
    pub fn open_rows(&self) -> u64 {
        self.open_rows.load(Ordering::Relaxed)
    }

    /// Notes that a broker source's messages went into this partition's log up to `logged_end`
    /// (exclusive), and the next offset of each of its broker partitions after them: the seal
    /// of the segment holding them records these offsets in the same transaction, where a
    /// node taking the partition over resumes the broker.
    pub fn note_offsets(&self, logged_end: u64, next: BTreeMap<i32, i64>) {
        self.marks.lock().push((logged_end, next));
    }

    /// The offsets noted for positions below `hi` (what a segment ending at `hi` records),
    /// highest per broker partition.
    pub(super) fn offsets_below(&self, hi: u64) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        for (end, next) in self.marks.lock().iter() {
            if *end <= hi {
                for (p, n) in next {
                    let e = out.entry(*p).or_insert(*n);
                    *e = (*e).max(*n);
                }
            }
        }
        out
    }
}

pub struct PipelineRuntime {
    /// The pipeline as it started: its name, source, schema, lookups, archive and dedupe
    /// settings, which a promote never changes. Its views as they run now — a promote may have
    /// changed them — are [`Self::plan`]'s (`plan().pipeline().views`).
    pub pipeline: Arc<Pipeline>,
    /// The definition the speed layer runs and serving finishes with: swapped, under the state
    /// lock, by a promote ([`Self::switch`]); a [`Snapshot`] carries the one it was taken with.
    pub(super) definition: RwLock<Arc<Plan>>,
    /// Held while the definition is being switched, and by batch runs of the server's own
    /// workflows: a run never publishes a definition the server no longer runs.
    switching: Arc<tokio::sync::Mutex<()>>,
    /// Held while a partition starts or stops running here, while segments other nodes sealed
    /// or open segments they run are absorbed, and by [`Self::switch`]: what they install is
    /// computed by the definition that runs. Not by batch runs, which hold `switching` for
    /// minutes: a node's leases and mirrors must not wait on them.
    moving: tokio::sync::Mutex<()>,
    /// The partitions this process runs, in partition order: `0..partitions`, then any
    /// partition beyond them (`partitions` was lowered) whose log still held events to
    /// archive — it takes no new ones, and is sealed by age.
    pub(super) lanes: Vec<Lane>,
    /// Where the door sends what it accepts when the pipeline has a `buffer`.
    pub(super) forward: OnceLock<Arc<dyn super::door::Forward>>,
    /// On a node: per partition it does not run, when (epoch ms) its owner last answered the
    /// mirror ([`super::nodes::Mirror`]).
    mirrored: Mutex<BTreeMap<u32, i64>>,
    /// The node this process is (`serve --node`): it runs only the partitions whose leases it
    /// holds ([`super::nodes`]); `None` runs every partition.
    node: Option<String>,
    /// The partitions this process runs now, with the epoch of their lease: every lane (epoch
    /// 0) without a node; with one, those it holds the lease of. Broker sources consume what
    /// maps to them.
    owned: watch::Sender<BTreeMap<u32, u64>>,
    /// Where the door sends a request without a key next (see [`Lane`]).
    pub(super) next_lane: AtomicUsize,
    /// The pipeline's lookup tables: the current versions (what a segment opening now is
    /// enriched with), the versions segments recorded, refresh figures.
    pub lookups: Arc<Lookups>,
    /// Partials and published batch views; serving reads them through [`Self::snapshot`].
    pub(super) state: Arc<RwLock<SpeedState>>,
    pub counters: Arc<Counters>,
    /// What the pipeline's source reports (lag), for status and metrics.
    pub source_status: Arc<SourceStatus>,
    /// The latest `verify` of the pipeline, as serving last read it from the state DB (its
    /// pickup keeps it fresh), for `/metrics` and answers' `as_of`.
    pub verified: RwLock<Option<VerifyStatus>>,
    /// The restatement ledger summed per view, as serving last read it from the state DB,
    /// for `/metrics`.
    pub restated: RwLock<BTreeMap<String, LedgerTotals>>,
    /// The clock the logs stamp requests with and serving places installs by.
    pub(super) stamps: Arc<Stamps>,
    /// Per lane: end (exclusive) of the sealed segments — every position below it is in the
    /// archive (manifest + checkpoint committed). Sources that may only acknowledge archived
    /// events (kafka) wait on it.
    pub(super) sealed_end: watch::Sender<Vec<u64>>,
    /// Held across admit → append so a failed append can un-admit its ids.
    pub(super) dedupe: Option<Arc<Mutex<Dedupe>>>,
    pub(super) lake: Lake,
    pub(super) db: State,
    /// Test hook: this many coming micro-batches fail as if the plan had failed on them.
    #[cfg(test)]
    pub(super) fail_applies: std::sync::atomic::AtomicU32,
}

impl PipelineRuntime {
    /// Recovers the pipeline's speed state and starts its aggregator/archiver task.
    pub async fn start(
        pipeline: Arc<Pipeline>,
        plan: Arc<Plan>,
        db: State,
        lake: Lake,
        lake_options: BTreeMap<String, String>,
        log_dir: &Path,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<PipelineRuntime>> {
        Self::start_on(
            None,
            pipeline,
            plan,
            db,
            lake,
            lake_options,
            log_dir,
            shutdown,
        )
        .await
    }

    /// [`Self::start`] on node `node` (`serve --node`), if any: then every partition's lane
    /// starts empty and idle at its checkpoint — the local write-ahead log is not where a
    /// partition's events are kept, the broker is — until the node takes its lease
    /// ([`Self::take`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_on(
        node: Option<String>,
        pipeline: Arc<Pipeline>,
        plan: Arc<Plan>,
        db: State,
        lake: Lake,
        lake_options: BTreeMap<String, String>,
        log_dir: &Path,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<PipelineRuntime>> {
        let name = pipeline.name.clone();
        if node.is_none() {
            recovery::refuse_beside_nodes(&db, &name, log_dir).await?;
        }
        let views = pipeline.views.len();
        let speed = Arc::new(RwLock::new(SpeedState::new(views)));
        let counters = Arc::new(Counters::default());
        let dedupe = pipeline
            .event_id
            .as_ref()
            .map(|_| Arc::new(Mutex::new(Dedupe::new(pipeline.dedupe_window))));

        // The lookups' current versions before any event is enriched: read from their sources,
        // or (a source failing) the newest sealed segment's, so a restart while PostgreSQL is
        // down goes on with what it had.
        let lookups = Lookups::new(pipeline.clone(), lake.clone(), lake_options);
        if !pipeline.lookups.is_empty() {
            let newest = db.segments(&name).await?.pop().and_then(|s| s.lookups);
            lookups.refresh_all(newest.as_deref()).await?;
            lookups.spawn_refreshes(shutdown.clone());
        }

        // Sealed segments first, then each partition's open segment from its log (see
        // `recovery`).
        let horizon_ms =
            now_ms() - i64::try_from(pipeline.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        let recent =
            dedupe
                .as_deref()
                .zip(pipeline.event_id.as_deref())
                .map(|(index, id_column)| recovery::Recent {
                    index,
                    id_column,
                    horizon_ms,
                });
        let found = recovery::sealed_segments(
            &pipeline, &plan, &lookups, &db, &lake, &speed, &counters, recent,
        )
        .await?;

        // The logs, each with its consumer: its partition's aggregator.
        let stamps = Arc::new(Stamps::default());
        let mut lanes = Vec::new();
        let mut opened = Vec::new();
        let partitions = match node {
            Some(_) => (0..pipeline.partitions).collect(),
            None => recovery::partitions(&pipeline, log_dir)?,
        };
        for partition in partitions {
            let checkpoint = db.checkpoint(&name, partition).await?.unwrap_or(0);
            let dir = log_dir.join(&name).join(format!("p={partition}"));
            if node.is_some() {
                recovery::start_log_over(&dir, checkpoint)?;
            } else if partition < pipeline.partitions {
                recovery::ensure_log_starts_at(&dir, checkpoint)?;
            } else if !recovery::holds_from(&dir, checkpoint)? {
                // Beyond `partitions`: runs only while its log holds events to archive.
                continue;
            }
            let (tx, rx) = mpsc::channel(AGGREGATOR_QUEUE);
            let (command_tx, command_rx) = mpsc::channel(1);
            let stamper = Stamper {
                stamps: stamps.clone(),
                log: lanes.len(),
                write: super::record::stamp_record,
            };
            let (log, next) = Log::open_stamped(&dir, Some(tx), Some(stamper))?;
            anyhow::ensure!(
                next >= checkpoint,
                "write-ahead log {} ends at {next} but the archive is sealed up to {checkpoint}; the log directory was replaced",
                dir.display()
            );
            let replayed = recovery::replay(&plan, &dir, checkpoint, recent)?;
            // On a node, a partition it does not run yet holds the segments found above;
            // those sealed since are caught up with (`catch_up`).
            let held = match node {
                Some(_) => found.get(&partition).copied().unwrap_or(0),
                None => checkpoint,
            };
            speed.write().absorbed.insert(partition, held);
            lanes.push(Lane {
                partition,
                log,
                logged_end: AtomicU64::new(next),
                open_rows: AtomicU64::new(0),
                open_since_ms: AtomicU64::new(0),
                open_lookups: RwLock::new(lookups.current()),
                commands: command_tx,
                marks: Mutex::new(Vec::new()),
                changes: AtomicU64::new(0),
            });
            opened.push((checkpoint, next, rx, command_rx, replayed));
        }
        let sealed: Vec<u64> = opened.iter().map(|o| o.0).collect();
        let owned = match node {
            Some(_) => BTreeMap::new(),
            None => lanes.iter().map(|l| (l.partition, 0)).collect(),
        };

        let rt = Arc::new(PipelineRuntime {
            pipeline: pipeline.clone(),
            definition: RwLock::new(plan.clone()),
            switching: Arc::new(tokio::sync::Mutex::new(())),
            moving: tokio::sync::Mutex::new(()),
            lanes,
            forward: OnceLock::new(),
            mirrored: Mutex::new(BTreeMap::new()),
            node,
            owned: watch::Sender::new(owned),
            next_lane: AtomicUsize::new(0),
            lookups: lookups.clone(),
            state: speed,
            counters,
            source_status: Arc::new(SourceStatus::default()),
            verified: RwLock::new(None),
            restated: RwLock::new(BTreeMap::new()),
            stamps,
            sealed_end: watch::Sender::new(sealed),
            dedupe,
            lake,
            db,
            #[cfg(test)]
            fail_applies: Default::default(),
        });
        // The open segments are absorbed before anything new is logged (nothing is: sources
        // and the door start after this returns), so the first answer already has them.
        let mut aggregators = Vec::new();
        let mut ends = Vec::new();
        for (lane, (checkpoint, next, rx, command_rx, replayed)) in opened.into_iter().enumerate() {
            let mut aggregator = Aggregator::new(rt.clone(), lane, checkpoint);
            if let Some(replayed) = replayed {
                aggregator.absorb_replayed(replayed).await;
            }
            aggregators.push((aggregator, rx, command_rx));
            ends.push(next);
        }
        // Everything logged so far is absorbed (or, if that failed, on its way through a
        // rebuild); what is logged from now on arrives at this instant or later.
        {
            let mut st = rt.state.write();
            let start = now_ms().max(st.tick.ms + 1);
            rt.stamps.restart(start, &ends);
            if st.absorbed.values().eq(ends.iter()) {
                st.tick = Tick { ms: start, n: 0 };
            }
        }
        for (aggregator, rx, command_rx) in aggregators {
            tokio::spawn(aggregator.run(rx, command_rx, shutdown.clone()));
        }
        Ok(rt)
    }

    /// The definition the pipeline runs now (its views as [`Plan::pipeline`]).
    pub fn plan(&self) -> Arc<Plan> {
        self.definition.read().clone()
    }

    /// Held while a promote switches the definition; a batch run of the server's workflows
    /// holds it too, and computes [`Self::plan`] taken under it.
    pub fn switching(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.switching.clone()
    }

    /// The state DB the pipeline records its archive (and restatement ledger) in.
    pub fn db(&self) -> &State {
        &self.db
    }

    /// The lake the pipeline archives its segments in.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// The instant the served state stands for now.
    pub fn tick(&self) -> Tick {
        self.state.read().tick
    }

    /// The lookup versions partition `partition`'s open segment is enriched with (`None`
    /// when this process does not run it).
    pub fn open_lookups(&self, partition: u32) -> Option<crate::plan::LookupSet> {
        Some(self.lane(partition)?.open_lookups.read().clone())
    }

    /// The lane of partition `partition`, if this process runs it.
    pub fn lane(&self, partition: u32) -> Option<&Lane> {
        self.lanes.iter().find(|l| l.partition == partition)
    }

    /// The partitions this process runs, in partition order.
    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    /// The partitions this process runs (see [`Lane`]), in order.
    pub fn partitions(&self) -> Vec<u32> {
        self.lanes.iter().map(|l| l.partition).collect()
    }

    /// The node this process is (`serve --node`), if any.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Watches the partitions this process runs now, with their leases' epochs (see
    /// [`Self::take`]).
    pub fn owned(&self) -> watch::Receiver<BTreeMap<u32, u64>> {
        self.owned.subscribe()
    }

    /// A seal found partition `partition`'s lease taken by another node: sources stop
    /// feeding it (its aggregator drops what it did not seal).
    pub(super) fn lost(&self, partition: u32) {
        self.owned.send_modify(|o| {
            o.remove(&partition);
        });
    }

    /// On a node: partition `partition`'s owner answered the mirror now.
    pub fn note_mirrored(&self, partition: u32) {
        self.mirrored.lock().insert(partition, now_ms());
    }

    /// On a node: the partitions it does not run whose owner has not answered the mirror
    /// within [`super::nodes::STALE_AFTER`] (none answers while a partition moves). Empty
    /// without a node.
    pub fn stale_partitions(&self) -> Vec<u32> {
        if self.node.is_none() {
            return Vec::new();
        }
        let limit = now_ms() - super::nodes::STALE_AFTER.as_millis() as i64;
        let mirrored = self.mirrored.lock();
        let owned = self.owned.borrow();
        self.partitions()
            .into_iter()
            .filter(|p| !owned.contains_key(p))
            .filter(|p| mirrored.get(p).is_none_or(|at| *at < limit))
            .collect()
    }

    /// Whether this process runs partition `partition` now.
    pub fn owns(&self, partition: u32) -> bool {
        self.owned.borrow().contains_key(&partition)
    }

    /// The index of partition `partition` among [`Self::lanes`].
    pub fn lane_index(&self, partition: u32) -> Option<usize> {
        self.lanes.iter().position(|l| l.partition == partition)
    }

    /// On a node: starts running partition `partition`, whose lease it now holds at `fence`.
    /// The segments other nodes sealed are absorbed first (up to the checkpoint, read after
    /// the lease was taken: a former holder can seal nothing more), then the partition's log
    /// and open segment start over at the checkpoint, and broker sources resume it from the
    /// offsets recorded with its segments.
    pub async fn take(&self, partition: u32, fence: Fence) -> anyhow::Result<()> {
        let index = self
            .lane_index(partition)
            .with_context(|| format!("no partition {partition}"))?;
        let _moving = self.moving.lock().await;
        self.catch_up_locked(&[partition]).await?;
        let checkpoint = self
            .db
            .checkpoint(&self.pipeline.name, partition)
            .await?
            .unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        let epoch = fence.epoch;
        let own = Command::Own {
            checkpoint,
            fence,
            reply,
        };
        let stopped = || anyhow::anyhow!("the pipeline's speed layer has stopped");
        self.lanes[index]
            .commands
            .send(own)
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())??;
        self.owned.send_modify(|o| {
            o.insert(partition, epoch);
        });
        Ok(())
    }

    /// On a node: stops running partition `partition` — sources stop feeding it first, then,
    /// when `seal` (a graceful hand-over), its open segment is sealed; what is not sealed is
    /// dropped (the broker redelivers it to the next holder).
    pub async fn give_up(&self, partition: u32, seal: bool) -> anyhow::Result<()> {
        let index = self
            .lane_index(partition)
            .with_context(|| format!("no partition {partition}"))?;
        self.owned.send_modify(|o| {
            o.remove(&partition);
        });
        let _moving = self.moving.lock().await;
        let (reply, answer) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the pipeline's speed layer has stopped");
        self.lanes[index]
            .commands
            .send(Command::Disown { seal, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// On a node: partition `partition`'s open segment as this node runs it — for the other
    /// nodes to mirror ([`Self::mirror`]) — unless it has not changed since `since` (a
    /// previous answer's version). `None` when this node does not run the partition.
    pub fn open_segment(&self, partition: u32, since: Option<u64>) -> Option<OpenSegment> {
        let index = self.lane_index(partition)?;
        if !self.owns(partition) {
            return None;
        }
        let lane = &self.lanes[index];
        let version = lane.changes.load(Ordering::Acquire);
        let plan = self.plan();
        let logic: Vec<String> = (0..plan.pipeline().views.len())
            .map(|v| plan.logic_hash(v))
            .collect();
        let st = self.state.read();
        let (lo, hi, rows, views) = match st.open_of(partition) {
            _ if since == Some(version) => (0, 0, 0, Vec::new()),
            Some((lo, seg)) => (lo, seg.hi, seg.rows, seg.views.clone()),
            None => {
                let at = st.absorbed.get(&partition).copied().unwrap_or(0);
                // Nothing open: no partials, for every view.
                (at, at, 0, vec![Vec::new(); logic.len()])
            }
        };
        Some(OpenSegment {
            partition,
            version,
            unchanged: since == Some(version),
            lo,
            hi,
            rows,
            logic,
            views,
            plan: Some(plan),
        })
    }

    /// On a node: installs another node's open segment of a partition this one does not run
    /// (see [`super::nodes`]) in place of the one mirrored before, once the segments sealed
    /// before it are absorbed here; an answer then holds that partition's fresh events too.
    /// Returns whether it was installed (not when it is older than what is absorbed here, or
    /// computed by another definition).
    pub async fn mirror(&self, open: OpenSegment) -> anyhow::Result<bool> {
        let p = open.partition;
        let plan = self.plan();
        let logic: Vec<String> = (0..plan.pipeline().views.len())
            .map(|v| plan.logic_hash(v))
            .collect();
        if open.logic != logic {
            anyhow::bail!(
                "partition {p}'s owner runs another definition of the views (promote on every node)"
            );
        }
        let _moving = self.moving.lock().await;
        if self.owns(p) {
            return Ok(false);
        }
        if self.absorbed().get(&p).copied().unwrap_or(0) < open.lo {
            self.catch_up_locked(&[p]).await?;
        }
        let mut st = self.state.write();
        if st.absorbed.get(&p).copied().unwrap_or(0) != open.lo {
            return Ok(false);
        }
        st.discard_open_of(p);
        if open.rows > 0 {
            let parts = open
                .views
                .into_iter()
                .map(concat_frames_or_empty)
                .collect::<PolarsResult<Vec<_>>>()?;
            st.absorb(&plan, p, open.lo, open.hi, open.rows, parts)?;
        }
        self.place_install(&mut st);
        Ok(true)
    }

    /// On a node: absorbs the segments other nodes sealed of the partitions this one does not
    /// run, so answers here hold every partition's archived events.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let others: Vec<u32> = {
            let owned = self.owned.borrow();
            self.partitions()
                .into_iter()
                .filter(|p| !owned.contains_key(p))
                .collect()
        };
        if others.is_empty() {
            return Ok(());
        }
        let _moving = self.moving.lock().await;
        self.catch_up_locked(&others).await
    }

    /// [`Self::catch_up`] of `partitions`, `moving` held.
    async fn catch_up_locked(&self, partitions: &[u32]) -> anyhow::Result<()> {
        let name = &self.pipeline.name;
        let checkpoints = self.db.checkpoints(name).await?;
        let mut absorbed = self.absorbed();
        let behind = |p: &u32| {
            checkpoints.get(p).copied().unwrap_or(0) > absorbed.get(p).copied().unwrap_or(0)
        };
        if !partitions.iter().any(behind) {
            return Ok(());
        }
        let plan = self.plan();
        let recent = self
            .dedupe
            .as_deref()
            .zip(self.pipeline.event_id.as_deref())
            .map(|(index, id_column)| recovery::Recent {
                index,
                id_column,
                horizon_ms: now_ms()
                    - i64::try_from(self.pipeline.dedupe_window.as_millis()).unwrap_or(i64::MAX),
            });
        for seg in self.db.segments(name).await? {
            let from = absorbed.get(&seg.partition).copied().unwrap_or(0);
            if !partitions.contains(&seg.partition) || seg.hi <= from {
                continue;
            }
            let read =
                recovery::foreign_segment(&plan, &self.lookups, &self.lake, &seg, from, recent)
                    .await?;
            let mut st = self.state.write();
            if st.absorbed.get(&seg.partition).copied().unwrap_or(0) != from {
                // Taken meanwhile: this node runs it now.
                absorbed.insert(seg.partition, u64::MAX);
                continue;
            }
            // What was mirrored of it from its owner: these events are in the segment now.
            st.discard_open_of(seg.partition);
            if let Some((rows, parts)) = read {
                let covered = st
                    .batch
                    .iter()
                    .all(|b| b.as_ref().is_some_and(|b| b.covers(seg.partition, seg.hi)));
                if !covered {
                    st.absorb(&plan, seg.partition, from, seg.hi, rows, parts)?;
                    st.seal(seg.partition, from, seg.hi);
                }
            }
            st.absorbed.insert(seg.partition, seg.hi);
            self.place_install(&mut st);
            drop(st);
            absorbed.insert(seg.partition, seg.hi);
            if let Some(i) = self.lane_index(seg.partition) {
                self.sealed_end.send_modify(|ends| ends[i] = seg.hi);
            }
        }
        Ok(())
    }

    /// The events partition `partition`'s write-ahead log holds durably from position `from`
    /// on (the open segment, when `from` is where the sealed ones end), with their positions
    /// and arrival times as the archive has them; `None` when it holds none (or this process
    /// does not run the partition now). Blocking (reads files). Fails when the log no longer starts at
    /// `from` (sealed and truncated meanwhile).
    pub fn logged(&self, partition: u32, from: u64) -> anyhow::Result<Option<DataFrame>> {
        let Some(lane) = self.lane(partition).filter(|_| self.owns(partition)) else {
            return Ok(None);
        };
        let end = lane.log.durable_end();
        let mut records = super::log::read_from(lane.log.dir(), from)?;
        records.retain(|(offset, _)| *offset < end);
        let Some(&(first, _)) = records.first() else {
            anyhow::ensure!(
                end <= from,
                "the write-ahead log no longer holds position {from}"
            );
            return Ok(None);
        };
        anyhow::ensure!(
            first == from && records.len() as u64 == end - from,
            "the write-ahead log holds {} of the positions {from}..{end}",
            records.len()
        );
        let events = super::record::decode_records(&self.plan(), &records)?;
        Ok(Some(super::record::with_positions(events, from..end, 0)?))
    }

    /// What a query of view `view` merges — the published batch view and the speed partials
    /// of the segments it does not cover — taken under one lock.
    pub fn snapshot(&self, view: usize) -> Snapshot {
        let st = self.state.read();
        // Under the state lock: a switch changes both under it.
        let plan = self.plan();
        st.snapshot(view, plan)
    }

    /// Changes with every absorb, seal and publish: an answer computed from a snapshot of this
    /// version is still the answer while it holds.
    pub fn version(&self) -> u64 {
        self.state.read().version()
    }

    /// Installs a published batch view of view `view` (serving's pickup); the segments every
    /// view's batch now covers are freed. Returns the instant of the install, for the record
    /// of what was served when ([`crate::state::State::record_served`]); `None`, installing
    /// nothing, when the batch view was computed by another definition than the one running
    /// (a promote switched it meanwhile).
    pub fn publish(&self, view: usize, batch: BatchView) -> Option<Tick> {
        let mut st = self.state.write();
        if batch.logic_hash != self.plan().logic_hash(view) {
            return None;
        }
        let tick = self.place_install(&mut st);
        st.publish(view, batch);
        Some(tick)
    }

    /// Moves the served state (whose lock the caller holds) to the instant of an install.
    pub(super) fn place_install(&self, st: &mut SpeedState) -> Tick {
        let absorbed: Vec<u64> = st.absorbed.values().copied().collect();
        st.tick = self.stamps.install(&absorbed, st.tick);
        st.tick
    }

    /// [`Self::publish`], returning what view `view` served just before and just after the
    /// switch (taken under the same lock as the switch), to record what the publication
    /// changed.
    pub fn publish_between(&self, view: usize, batch: BatchView) -> Option<(Snapshot, Snapshot)> {
        let mut st = self.state.write();
        let plan = self.plan();
        if batch.logic_hash != plan.logic_hash(view) {
            return None;
        }
        let before = st.snapshot(view, plan.clone());
        self.place_install(&mut st);
        st.publish(view, batch);
        Some((before, st.snapshot(view, plan)))
    }

    /// Switches the definition the pipeline runs to `plan` (a promote; the caller holds
    /// [`Self::switching`]), whose views are the running ones, in their order, then any new
    /// ones (indexes of running views stay). Every partition's aggregator pauses between two
    /// micro-batches and computes its open segment's partials by `plan`; then the partials by
    /// `plan` of every sealed segment the batch views of `serve` do not all cover are computed
    /// beside the state served now, `commit` runs (the state DB's switch of the
    /// publications), and the new partials, batch views and definition are installed under one
    /// lock. An answer is the old definition's or the new one's, never a mix. Ingest waits
    /// meanwhile (what arrives is in the logs); when anything fails before the install,
    /// nothing changed.
    pub async fn switch(
        &self,
        plan: Arc<Plan>,
        serve: Vec<Serve>,
        commit: BoxFuture<'static, anyhow::Result<()>>,
    ) -> anyhow::Result<Switched> {
        anyhow::ensure!(
            serve.len() == plan.pipeline().views.len(),
            "{} views to serve for {} views",
            serve.len(),
            plan.pipeline().views.len()
        );
        // No partition starts, stops or is absorbed from other nodes meanwhile.
        let _moving = self.moving.lock().await;
        let stopped = || anyhow::anyhow!("the pipeline's speed layer has stopped");
        // Dropped on return, done or failed: every paused aggregator goes on.
        let mut resumes = Vec::with_capacity(self.lanes.len());
        let mut replies = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            let (reply, answer) = oneshot::channel();
            let (resume_tx, resume) = oneshot::channel();
            let pause = Pause {
                plan: plan.clone(),
                reply,
                resume,
            };
            lane.commands
                .send(Command::Pause(pause))
                .await
                .map_err(|_| stopped())?;
            resumes.push(resume_tx);
            replies.push(answer);
        }
        let mut open = Vec::with_capacity(replies.len());
        for answer in replies {
            open.extend(answer.await.map_err(|_| stopped())??);
        }
        let mut next = SpeedState::new(serve.len());
        {
            let st = self.state.read();
            for (v, s) in serve.iter().enumerate() {
                next.batch[v] = match s {
                    Serve::Keep => st.batch.get(v).cloned().flatten(),
                    Serve::Batch(b) => b.clone(),
                };
            }
        }
        // Sealed segments from the lake; the open ones from the paused aggregators. Nothing is
        // sealed or absorbed meanwhile.
        let absorbed = self.absorbed();
        recovery::uncovered_segments(
            &plan,
            &self.lookups,
            &self.db,
            &self.lake,
            &absorbed,
            &mut next,
        )
        .await?;
        for o in open {
            next.absorb(&plan, o.partition, o.lo, o.hi, o.rows, o.parts)?;
        }
        commit.await?;
        let mut st = self.state.write();
        // A kept view serves the batch view installed last (pickup may have installed a newer
        // one meanwhile: it covers more, and the segments it covers are skipped by answers).
        for (v, s) in serve.iter().enumerate() {
            if let Serve::Keep = s {
                next.batch[v] = st.batch.get(v).cloned().flatten();
            }
        }
        let old = self.plan();
        // Views the old definition had too (a promote adds views after the others).
        let had = old.pipeline().views.len();
        let changed: Vec<usize> = (0..serve.len().min(had))
            .filter(|v| matches!(serve[*v], Serve::Batch(_)))
            .collect();
        let before: Vec<Snapshot> = changed
            .iter()
            .map(|v| st.snapshot(*v, old.clone()))
            .collect();
        st.switch_to(next);
        // On a node: the open segments mirrored from other nodes are the old definition's —
        // dropped, their partitions answered as stale until mirrored again by the new one.
        if self.node.is_some() {
            let owned = self.owned.borrow().clone();
            for p in self.partitions() {
                if !owned.contains_key(&p) {
                    st.discard_open_of(p);
                }
            }
            self.mirrored.lock().clear();
        }
        *self.definition.write() = plan.clone();
        let at = self.place_install(&mut st);
        let changed = changed
            .into_iter()
            .zip(before)
            .map(|(v, before)| (v, before, st.snapshot(v, plan.clone())))
            .collect();
        drop(st);
        drop(resumes);
        Ok(Switched { at, old, changed })
    }

    /// The publication view `view` serves now, if any.
    pub fn installed(&self, view: usize) -> Option<crate::state::PublicationId> {
        self.state.read().installed(view)
    }

    /// The instant from which serving answers with what it holds now — the first thing a
    /// server records for a view without a publication to install (which logic it runs).
    pub fn mark_served(&self) -> Tick {
        self.place_install(&mut self.state.write())
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

    /// Per lane (in [`Self::partitions`] order): end (exclusive) of its write-ahead log —
    /// positions below it are durable. Read after `ingest` returned, each is at or above
    /// every position that call wrote there (or, for events it dropped as duplicates, of the
    /// earlier copies).
    pub fn logged_end(&self) -> Vec<u64> {
        self.lanes.iter().map(Lane::logged_end).collect()
    }

    /// Watches, per lane, the end (exclusive) of the sealed segments: positions below it are
    /// archived and will never be replayed from the log. Starts at the checkpoints recovered
    /// at start.
    pub fn sealed_end(&self) -> watch::Receiver<Vec<u64>> {
        self.sealed_end.subscribe()
    }

    /// Per partition run here: end (exclusive) of the positions absorbed into the served state.
    pub fn absorbed(&self) -> BTreeMap<u32, u64> {
        self.state.read().absorbed.clone()
    }

    /// Events of the open segments, all partitions together.
    pub fn open_rows(&self) -> u64 {
        self.lanes.iter().map(Lane::open_rows).sum()
    }

    /// Arrival time (epoch ms) of the oldest open segment's first event; `None` when every
    /// open segment is empty.
    pub fn open_since_ms(&self) -> Option<u64> {
        self.lanes
            .iter()
            .map(|l| l.open_since_ms.load(Ordering::Relaxed))
            .filter(|ms| *ms > 0)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use polars::prelude::*;

    use super::Serve;
    use crate::plan::Plan;
    use crate::speed::door::partition_of;
    use crate::speed::testing::{
        Project, events, partitioned_spec as spec, served, total, wait_for,
    };

    /// The ids partition `p`'s log holds from position 0.
    fn logged_ids(rt: &super::PipelineRuntime, p: u32) -> Vec<String> {
        let Some(df) = rt.logged(p, 0).unwrap() else {
            return Vec::new();
        };
        let ids = df.column("id").unwrap().str().unwrap().clone();
        ids.iter().map(|s| s.unwrap().to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_route_by_key_deduplicate_archive_apart_and_recover() {
        let mut p = Project::new(&spec(3, "event_id: id", "1h")).await;
        let rt = p.start().await;
        assert_eq!(rt.partitions(), [0, 1, 2]);
        let r = rt.ingest(events(0..60)).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (60, 0));
        // Copies of ten events and five new ones: the copies reach the partitions of their
        // first copies, and are dropped there.
        let r = rt.ingest(events(50..65)).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (5, 10));
        wait_for("absorbed", async || served(&rt).0 == 65).await;
        assert_eq!(served(&rt), (65, total(0..65)));
        let mut all = BTreeSet::new();
        for part in 0..3 {
            let ids = logged_ids(&rt, part);
            assert!(!ids.is_empty(), "partition {part} took no event");
            for id in &ids {
                assert_eq!(partition_of(id, 3), part as usize, "{id}");
                assert!(all.insert(id.clone()), "{id} twice");
            }
        }
        assert_eq!(all.len(), 65);

        // A promote's switch pauses every partition: a view added by it counts all of them.
        let mut next = (*p.pipeline).clone();
        let mut added = next.views[0].clone();
        added.name = "again".into();
        next.views.push(added);
        let plan = Arc::new(Plan::compile(&next).unwrap());
        let serve = vec![Serve::Keep, Serve::Batch(None)];
        let switched = rt
            .switch(plan, serve, Box::pin(async { Ok(()) }))
            .await
            .unwrap();
        assert!(switched.changed.is_empty());
        let snap = rt.snapshot(1);
        let merged = snap.plan.merge(1, snap.speed.clone()).unwrap();
        let answer = snap.plan.finish(1, merged).unwrap();
        let n = answer.column("n").unwrap().cast(&DataType::UInt64).unwrap();
        assert_eq!(n.u64().unwrap().get(0), Some(65));
        let r = rt.ingest(events(65..70)).await.unwrap();
        assert_eq!(r.accepted, 5);
        wait_for("absorbed after the switch", async || served(&rt).0 == 70).await;

        // A restart replays every partition's log; the id index is rebuilt.
        let rt = p.start().await;
        assert_eq!(served(&rt), (70, total(0..70)));
        let r = rt.ingest(events(0..5)).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 5));

        // Fewer partitions: the ones beyond still run while their logs hold events to
        // archive, take no new events, and are sealed by age; then they stop running.
        let mut fewer = (*p.pipeline).clone();
        fewer.partitions = 1;
        fewer.archive.segment_age = std::time::Duration::from_millis(200);
        p.plan = Arc::new(Plan::compile(&fewer).unwrap());
        p.pipeline = Arc::new(fewer);
        let rt = p.start().await;
        assert_eq!(rt.partitions(), [0, 1, 2]);
        assert_eq!(served(&rt), (70, total(0..70)));
        let before = rt.logged_end();
        let r = rt.ingest(events(100..130)).await.unwrap();
        assert_eq!(r.accepted, 30);
        let after = rt.logged_end();
        assert_eq!(
            after[0] - before[0],
            30,
            "new events go to partition 0 only"
        );
        assert_eq!(after[1..], before[1..]);
        wait_for("every partition sealed", async || {
            let mut sealed = 0;
            for part in 0..3 {
                sealed += p.db.checkpoint("orders", part).await.unwrap().unwrap_or(0);
            }
            sealed == 100
        })
        .await;
        for s in p.db.segments("orders").await.unwrap() {
            assert!(
                s.path.contains(&format!("/p={}/", s.partition)),
                "{}",
                s.path
            );
        }
        let rt = p.start().await;
        assert_eq!(rt.partitions(), [0]);
        assert_eq!(served(&rt), (100, total(0..70) + total(100..130)));
        p.shutdown.cancel();
    }

    /// Partitions sealing at the same moment share the pipeline's unsealed rejections: each
    /// is recorded with exactly one segment (seen: two seals each subtracted the same count,
    /// the counter wrapped, and no partition could seal again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_sealing_together_record_each_rejection_once() {
        let mut p = Project::new(&spec(3, "event_id: id", "200ms")).await;
        let rt = p.start().await;
        for round in 0..3u32 {
            let mut body = events(round * 30..round * 30 + 30).to_vec();
            body.extend_from_slice(b"\nnot json\nnot json either");
            let r = rt.ingest(body.into()).await.unwrap();
            assert_eq!((r.accepted, r.rejected), (30, 2));
            let sealed_up_to = (round + 1) * 30;
            wait_for("every partition sealed", async || {
                let mut sealed = 0;
                for part in 0..3 {
                    sealed += p.db.checkpoint("orders", part).await.unwrap().unwrap_or(0);
                }
                sealed == u64::from(sealed_up_to)
            })
            .await;
        }
        let segments = p.db.segments("orders").await.unwrap();
        let dead: u64 = segments.iter().map(|s| s.dead_letters).sum();
        assert_eq!(dead, 6, "{segments:?}");
        let unsealed = &rt.counters.rejected_unsealed;
        assert_eq!(unsealed.load(std::sync::atomic::Ordering::Relaxed), 0);
        p.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_key_each_request_goes_whole_to_the_next_partition() {
        let mut p = Project::new(&spec(2, "", "1h")).await;
        let rt = p.start().await;
        rt.ingest(events(0..7)).await.unwrap();
        rt.ingest(events(7..10)).await.unwrap();
        let mut ends = rt.logged_end();
        ends.sort_unstable();
        assert_eq!(ends, [3, 7]);
        wait_for("absorbed", async || served(&rt).0 == 10).await;
        assert_eq!(served(&rt), (10, total(0..10)));
        p.shutdown.cancel();
    }
}
