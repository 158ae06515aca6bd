//! The speed layer's state: partials per segment and view (DESIGN.md §3), plus the published
//! batch view per view, behind ONE lock so the serving layer reads both under one consistent
//! snapshot — a publish racing a query can never double count or drop a segment.
//!
//! Memory is bounded by distinct (window, key) groups per segment since the last batch publish:
//! each segment keeps at most a few small partial frames per view (merged when they pile up),
//! and a segment's partials are freed once every view's published batch covers it.

use std::collections::BTreeMap;
use std::sync::Arc;

use polars::prelude::*;

use crate::clock::Tick;
use crate::plan::Plan;
use crate::state::PublicationId;

/// Merge a segment's pending partial frames of a view once there are this many.
const MAX_PENDING: usize = 8;

/// Partials of one segment `[lo, hi)` of a partition.
#[derive(Clone)]
pub struct SegmentPartials {
    pub hi: u64,
    pub sealed: bool,
    pub rows: u64,
    /// Per view: partial frames not yet merged with each other.
    pub views: Vec<Vec<DataFrame>>,
}

/// A published batch view as served: the partials and the positions they cover.
#[derive(Clone)]
pub struct BatchView {
    /// The publication it is.
    pub publication: PublicationId,
    /// The definition of the view that computed it.
    pub logic_hash: String,
    pub run_id: String,
    /// partition → first position NOT covered.
    pub cutoff: BTreeMap<u32, u64>,
    pub partials: DataFrame,
    pub published_at_ms: i64,
    /// Windows that ended at or before this instant (epoch ms) are retired (`retention`):
    /// not in `partials`, and left out of the speed layer's part of the answer too.
    pub horizon_ms: Option<i64>,
}

impl BatchView {
    pub fn covers(&self, partition: u32, hi: u64) -> bool {
        self.cutoff.get(&partition).is_some_and(|c| hi <= *c)
    }
}

/// Everything a query of one pipeline needs, under one lock.
#[derive(Default)]
pub struct SpeedState {
    /// (partition, lo) → partials.
    pub segments: BTreeMap<(u32, u64), SegmentPartials>,
    /// Per view index: the published batch view, if any.
    pub batch: Vec<Option<BatchView>>,
    /// Bumped by every change (absorb, seal, publish): an answer computed from a snapshot of
    /// version `v` is still the answer while the version is `v`.
    version: u64,
    /// The instant this state stands for: the events logged and the publications installed up
    /// to it are in it, and nothing else (`as_of` recomputes it from the archive).
    pub tick: Tick,
    /// Per partition run here: end (exclusive) of the log positions absorbed.
    pub absorbed: BTreeMap<u32, u64>,
}

/// The frames a query of one view merges, taken under the lock; merging happens outside it.
pub struct Snapshot {
    /// [`SpeedState::version`] the snapshot was taken at.
    pub version: u64,
    pub batch: Option<BatchView>,
    pub speed: Vec<DataFrame>,
    /// Uncovered segments contributing, and their rows.
    pub speed_segments: usize,
    pub speed_events: u64,
    /// [`SpeedState::tick`] the snapshot was taken at.
    pub tick: Tick,
    /// Per partition: end (exclusive) of the positions the snapshot holds — its batch view's
    /// cutoff, the segments the speed layer holds, what it absorbed.
    pub positions: BTreeMap<u32, u64>,
    /// The definition the partials were computed by, to merge and finish them with.
    pub plan: Arc<Plan>,
}

impl Snapshot {
    /// Every partial frame of the answer: the batch view's, then the speed layer's.
    pub fn frames(self) -> Vec<DataFrame> {
        let mut frames: Vec<DataFrame> = self.batch.map(|b| b.partials).into_iter().collect();
        frames.extend(self.speed);
        frames
    }
}

impl SpeedState {
    pub fn new(views: usize) -> Self {
        SpeedState {
            segments: BTreeMap::new(),
            batch: vec![None; views],
            version: 0,
            tick: Tick::default(),
            absorbed: BTreeMap::new(),
        }
    }

    /// Adds micro-batch partials (one frame per view) to the open segment `(partition, lo)`.
    /// All or nothing: when a merge fails, the state is as it was.
    pub fn absorb(
        &mut self,
        plan: &Plan,
        partition: u32,
        lo: u64,
        hi: u64,
        rows: u64,
        parts: Vec<DataFrame>,
    ) -> PolarsResult<()> {
        let current = self.segments.get(&(partition, lo));
        let mut views: Vec<Vec<DataFrame>> = match current {
            Some(seg) => seg.views.clone(),
            None => vec![Vec::new(); parts.len()],
        };
        for (i, p) in parts.into_iter().enumerate() {
            if p.height() == 0 {
                continue;
            }
            let pending = &mut views[i];
            pending.push(p);
            if pending.len() >= MAX_PENDING {
                let merged = plan.merge(i, std::mem::take(pending))?;
                pending.push(merged);
            }
        }
        self.version += 1;
        let seg = self
            .segments
            .entry((partition, lo))
            .or_insert_with(|| SegmentPartials {
                hi,
                sealed: false,
                rows: 0,
                views: Vec::new(),
            });
        seg.hi = seg.hi.max(hi);
        seg.rows += rows;
        seg.views = views;
        Ok(())
    }

    /// Forgets the partials of the open (unsealed) segment `(partition, lo)`, to rebuild them
    /// from the write-ahead log. Sealed segments stay.
    pub fn discard_open(&mut self, partition: u32, lo: u64) {
        if self
            .segments
            .get(&(partition, lo))
            .is_some_and(|seg| !seg.sealed)
        {
            self.version += 1;
            self.segments.remove(&(partition, lo));
        }
    }

    /// Forgets every open (unsealed) segment of `partition`: what a node runs of it starts
    /// over, or what it mirrored of another node's is replaced.
    pub fn discard_open_of(&mut self, partition: u32) {
        let before = self.segments.len();
        self.segments
            .retain(|(p, _), seg| *p != partition || seg.sealed);
        if self.segments.len() != before {
            self.version += 1;
        }
    }

    /// The open (unsealed) segment of `partition`: its first position and its partials.
    pub fn open_of(&self, partition: u32) -> Option<(u64, &SegmentPartials)> {
        self.segments
            .iter()
            .find(|((p, _), seg)| *p == partition && !seg.sealed)
            .map(|((_, lo), seg)| (*lo, seg))
    }

    pub fn seal(&mut self, partition: u32, lo: u64, hi: u64) {
        self.version += 1;
        if let Some(seg) = self.segments.get_mut(&(partition, lo)) {
            seg.sealed = true;
            seg.hi = hi;
        }
    }

    /// Installs a published batch view and frees segments every view's batch now covers.
    pub fn publish(&mut self, view: usize, batch: BatchView) {
        self.version += 1;
        self.batch[view] = Some(batch);
        let batch = &self.batch;
        self.segments.retain(|(p, _), seg| {
            !batch
                .iter()
                .all(|b| b.as_ref().is_some_and(|b| b.covers(*p, seg.hi)))
        });
    }

    /// Takes `next`'s partials and batch views — a switch of the definition — keeping the
    /// instant it stands for and the positions absorbed.
    pub fn switch_to(&mut self, next: SpeedState) {
        self.version += 1;
        self.segments = next.segments;
        self.batch = next.batch;
    }

    /// The publication view `view` serves, if any.
    pub fn installed(&self, view: usize) -> Option<PublicationId> {
        Some(self.batch.get(view)?.as_ref()?.publication)
    }

    pub fn snapshot(&self, view: usize, plan: Arc<Plan>) -> Snapshot {
        let batch = self.batch.get(view).cloned().flatten();
        let mut speed = Vec::new();
        let (mut speed_segments, mut speed_events) = (0, 0);
        for ((p, _), seg) in &self.segments {
            if batch.as_ref().is_some_and(|b| b.covers(*p, seg.hi)) {
                continue;
            }
            speed_segments += 1;
            speed_events += seg.rows;
            speed.extend(seg.views[view].iter().cloned());
        }
        let mut positions = self.absorbed.clone();
        let ends = self.segments.iter().map(|((p, _), seg)| (p, &seg.hi));
        for (p, end) in ends.chain(batch.iter().flat_map(|b| &b.cutoff)) {
            let e = positions.entry(*p).or_default();
            *e = (*e).max(*end);
        }
        Snapshot {
            version: self.version,
            batch,
            speed,
            speed_segments,
            speed_events,
            tick: self.tick,
            positions,
            plan,
        }
    }

    /// What view `view` serves around segment `(partition, lo)`: every other partial frame
    /// (the batch view's and the other uncovered segments'), the segment's own frames, and the
    /// retention horizon — a late-event restatement compares the answer with and without the
    /// segment's late events.
    pub fn around(
        &self,
        view: usize,
        partition: u32,
        lo: u64,
    ) -> (Vec<DataFrame>, Vec<DataFrame>, Option<i64>) {
        let batch = self.batch.get(view).and_then(Option::as_ref);
        let mut others: Vec<DataFrame> = batch.map(|b| b.partials.clone()).into_iter().collect();
        let mut own = Vec::new();
        for (&(p, l), seg) in &self.segments {
            if batch.is_some_and(|b| b.covers(p, seg.hi)) {
                continue;
            }
            let frames = seg.views[view].iter().cloned();
            if (p, l) == (partition, lo) {
                own.extend(frames);
            } else {
                others.extend(frames);
            }
        }
        (others, own, batch.and_then(|b| b.horizon_ms))
    }

    /// Changes with every absorb, seal and publish.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn groups(&self) -> usize {
        self.segments
            .values()
            .flat_map(|s| s.views.iter().flatten())
            .map(DataFrame::height)
            .sum()
    }

    /// Heap size of the speed partials (polars' estimate); batch views not included.
    pub fn estimated_bytes(&self) -> usize {
        self.segments
            .values()
            .flat_map(|s| s.views.iter().flatten())
            .map(DataFrame::estimated_size)
            .sum()
    }
}
