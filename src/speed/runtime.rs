//! One pipeline's speed layer, wired: the door ([`super::door`]: decode → dead letters →
//! de-duplicate → write-ahead log), the aggregator and archiver ([`super::aggregator`]:
//! micro-batches through the plan into partials of the open segment; seal it into a Parquet
//! file in the lake + manifest row and checkpoint in one state transaction), recovery at start
//! ([`super::recovery`]: partials of uncovered sealed segments from their Parquet files, the
//! open segment replayed from the log) and the log's records ([`super::record`]).
//!
//! Position-less sources (HTTP, generator, file) use partition 0 of the pipeline's own log.
//!
//! Bounded: the log hands durable events to the aggregator through a channel of
//! [`AGGREGATOR_QUEUE`] micro-batches; when the aggregator falls behind, the log's writer and
//! then the door wait.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
use crate::state::{LedgerTotals, State, VerifyStatus};
use crate::telemetry::{Histogram, LATENCY_BUCKETS, RateMeter};

/// The partition of the pipeline's own write-ahead log.
pub(super) const LOG_PARTITION: u32 = 0;
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

/// What a view serves after a switch of the definition ([`PipelineRuntime::switch`]).
pub enum Serve {
    /// The batch view it serves at the switch (its definition did not change).
    Keep,
    /// This batch view (or none: the speed layer alone), computed by the new definition.
    Batch(Option<BatchView>),
}

/// A switch of the definition, for the aggregator (see [`PipelineRuntime::switch`]).
pub(super) struct Switch {
    pub plan: Arc<Plan>,
    pub serve: Vec<Serve>,
    pub commit: BoxFuture<'static, anyhow::Result<()>>,
    pub done: oneshot::Sender<anyhow::Result<Switched>>,
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
    /// To the aggregator, which switches the definition between micro-batches.
    switches: mpsc::Sender<Switch>,
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
    pub(super) log: Log<Batch>,
    /// The clock the log stamps requests with and serving places installs by.
    pub(super) stamps: Arc<Stamps>,
    /// The lookup versions the open segment is enriched with (kept by the aggregator), for
    /// `as_of` answers that recompute it.
    pub(super) open_lookups: RwLock<crate::plan::LookupSet>,
    /// End (exclusive) of the write-ahead log: every position below it is durable.
    pub(super) logged_end: AtomicU64,
    /// End (exclusive) of the sealed segments: every position below it is in the archive
    /// (manifest + checkpoint committed). Sources that may only acknowledge archived events
    /// (kafka) wait on it.
    pub(super) sealed_end: watch::Sender<u64>,
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
        let name = pipeline.name.clone();
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

        // Sealed segments first, then the open segment from the log (see `recovery`).
        let checkpoint = db.checkpoint(&name, LOG_PARTITION).await?.unwrap_or(0);
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
        recovery::sealed_segments(
            &pipeline, &plan, &lookups, &db, &lake, &speed, &counters, recent,
        )
        .await?;
        speed.write().absorbed = checkpoint;

        // The log, with its consumer: the aggregator.
        let log_dir = log_dir.join(&name).join(format!("p={LOG_PARTITION}"));
        recovery::ensure_log_starts_at(&log_dir, checkpoint)?;
        let (tx, rx) = mpsc::channel(AGGREGATOR_QUEUE);
        let (switch_tx, switch_rx) = mpsc::channel(1);
        let stamps = Arc::new(Stamps::default());
        let stamper = Stamper {
            stamps: stamps.clone(),
            write: super::record::stamp_record,
        };
        let (log, next) = Log::open_stamped(&log_dir, Some(tx), Some(stamper))?;
        anyhow::ensure!(
            next >= checkpoint,
            "write-ahead log {} ends at {next} but the archive is sealed up to {checkpoint}; the log directory was replaced",
            log_dir.display()
        );

        let replayed = recovery::replay(&plan, &log_dir, checkpoint, recent)?;

        let rt = Arc::new(PipelineRuntime {
            pipeline: pipeline.clone(),
            definition: RwLock::new(plan.clone()),
            switching: Arc::new(tokio::sync::Mutex::new(())),
            switches: switch_tx,
            lookups: lookups.clone(),
            state: speed,
            counters,
            source_status: Arc::new(SourceStatus::default()),
            verified: RwLock::new(None),
            restated: RwLock::new(BTreeMap::new()),
            open_lookups: RwLock::new(lookups.current()),
            log,
            stamps,
            logged_end: AtomicU64::new(next),
            sealed_end: watch::Sender::new(checkpoint),
            dedupe,
            lake,
            db,
            #[cfg(test)]
            fail_applies: Default::default(),
        });
        // The open segment is absorbed before anything new is logged (nothing is: sources
        // and the door start after this returns), so the first answer already has it.
        let mut aggregator = Aggregator::new(rt.clone(), checkpoint);
        if let Some(replayed) = replayed {
            aggregator.absorb_replayed(replayed).await;
        }
        // Everything logged so far is absorbed (or, if that failed, on its way through a
        // rebuild); what is logged from now on arrives at this instant or later.
        {
            let mut st = rt.state.write();
            let start = now_ms().max(st.tick.ms + 1);
            rt.stamps.restart(start, next);
            if st.absorbed == next {
                st.tick = Tick { ms: start, n: 0 };
            }
        }
        tokio::spawn(aggregator.run(rx, switch_rx, shutdown));
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

    /// The lookup versions the open segment is enriched with.
    pub fn open_lookups(&self) -> crate::plan::LookupSet {
        self.open_lookups.read().clone()
    }

    /// The events the write-ahead log holds durably from position `from` on (the open
    /// segment, when `from` is where the sealed ones end), with their positions and arrival
    /// times as the archive has them; `None` when it holds none. Blocking (reads files). Fails
    /// when the log no longer starts at `from` (sealed and truncated meanwhile).
    pub fn logged(&self, from: u64) -> anyhow::Result<Option<DataFrame>> {
        let end = self.log.durable_end();
        let mut records = super::log::read_from(self.log.dir(), from)?;
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
        st.tick = self.stamps.install(st.absorbed, st.tick);
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
    /// ones (indexes of running views stay). The aggregator, between micro-batches, computes the partials by
    /// `plan` of every sealed segment the batch views of `serve` do not all cover and of the
    /// open segment, beside the state served now; then runs `commit` (the state DB's switch of
    /// the publications), and installs the new partials, batch views and definition under one
    /// lock. An answer is the old definition's or the new one's, never a mix. Ingest waits
    /// meanwhile (what arrives is in the log); when anything fails before the install, nothing
    /// changed.
    pub async fn switch(
        &self,
        plan: Arc<Plan>,
        serve: Vec<Serve>,
        commit: BoxFuture<'static, anyhow::Result<()>>,
    ) -> anyhow::Result<Switched> {
        let (done, result) = oneshot::channel();
        let switch = Switch {
            plan,
            serve,
            commit,
            done,
        };
        let stopped = || anyhow::anyhow!("the pipeline's speed layer has stopped");
        self.switches.send(switch).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
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
}
