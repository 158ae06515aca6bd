//! Recovery at start: the partials of the sealed segments no published batch view covers,
//! rebuilt from their Parquet files (and the de-duplication index from the ids that arrived
//! within `dedupe_window`), then the open segment replayed from the write-ahead log. Segments
//! every view's published batch (of the current logic) covers are served from it and not read:
//! a restart reads only what it needs, not the whole archive.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use polars::prelude::*;

use super::dedupe::Dedupe;
use super::door::id_strings;
use super::log;
use super::lookups::Lookups;
use super::partials::SpeedState;
use super::record::{ARRIVAL_COLUMN, decode_records};
use super::runtime::{Batch, Counters};
use crate::lake::Lake;
use crate::plan::{LookupSet, Plan};
use crate::spec::Pipeline;
use crate::state::{self, State};

/// The de-duplication index to refill, the column of the ids, and since when (epoch ms) ids
/// count: those that arrived after it.
#[derive(Clone, Copy)]
pub(super) struct Recent<'a> {
    pub index: &'a Mutex<Dedupe>,
    pub id_column: &'a str,
    pub horizon_ms: i64,
}

impl Recent<'_> {
    /// Re-admits the ids of `events` that arrived after the horizon.
    fn admit(&self, events: &DataFrame) -> anyhow::Result<()> {
        admit_recent(
            &mut self.index.lock(),
            events,
            self.id_column,
            self.horizon_ms,
        )
    }
}

/// Sealed segments: rebuilds their partials (and recent ids) from the lake — except those
/// every view's published batch (of the current logic) covers. Returns, per partition, the
/// end of the segments it found (what the state now holds of it).
#[allow(clippy::too_many_arguments)]
pub(super) async fn sealed_segments(
    pipeline: &Pipeline,
    plan: &Arc<Plan>,
    lookups: &Lookups,
    db: &State,
    lake: &Lake,
    speed: &RwLock<SpeedState>,
    counters: &Counters,
    recent: Option<Recent<'_>>,
) -> anyhow::Result<std::collections::BTreeMap<u32, u64>> {
    let name = &pipeline.name;
    let segments = db.segments(name).await?;
    let mut ends = std::collections::BTreeMap::new();
    for seg in &segments {
        let end = ends.entry(seg.partition).or_insert(seg.hi);
        *end = (*end).max(seg.hi);
    }
    counters
        .sealed_segments
        .store(segments.len() as u64, Ordering::Relaxed);
    let covered = db
        .covered_where(pipeline, |v, p| p.logic_hash == plan.logic_hash(v))
        .await?;
    let sealed_at = match (&covered, &recent) {
        (Some(_), Some(_)) => db.sealed_at(name).await?,
        _ => Default::default(),
    };
    let mut skipped = 0usize;
    let mut sets = RecordedSets::default();
    for seg in &segments {
        let is_covered = covered.as_ref().is_some_and(|c| state::is_covered(c, seg));
        // Ids that arrived within the dedupe window are in segments sealed after its start.
        let has_recent_ids = recent.is_some_and(|r| {
            sealed_at
                .get(&(seg.partition, seg.lo))
                .is_none_or(|at| at.timestamp_millis() > r.horizon_ms)
        });
        if is_covered && !has_recent_ids {
            skipped += 1;
            continue;
        }
        let events = read_segment(lake, seg).await?;
        if let Some(r) = recent
            && seg.max_event_ms.is_some()
        {
            r.admit(&events)?;
        }
        if is_covered {
            continue;
        }
        let set = sets.of(lookups, seg).await?;
        let parts = sealed_partials(plan, &events, set).await?;
        absorb_sealed(plan, &mut speed.write(), seg, events.height(), parts)?;
    }
    if skipped > 0 {
        tracing::info!(
            pipeline = %name,
            skipped,
            "sealed segments covered by the published batch views are served from them, not read"
        );
    }
    Ok(ends)
}

/// The partials, by `plan`, of every sealed segment of the pipeline that the batch views in
/// `speed` (installed beforehand) do not all cover — what a switch of the definition serves
/// beside them. Segments are read from the lake as [`sealed_segments`] reads them.
///
/// Positions at or beyond `absorbed` (per partition) are left out: on a node, segments other
/// nodes sealed since its last catch-up are absorbed by the next one
/// (`PipelineRuntime::catch_up`), not twice.
pub(super) async fn uncovered_segments(
    plan: &Arc<Plan>,
    lookups: &Lookups,
    db: &State,
    lake: &Lake,
    absorbed: &std::collections::BTreeMap<u32, u64>,
    speed: &mut SpeedState,
) -> anyhow::Result<()> {
    let mut sets = RecordedSets::default();
    for mut seg in db.segments(&plan.pipeline().name).await? {
        let end = absorbed.get(&seg.partition).copied().unwrap_or(u64::MAX);
        if seg.lo >= end {
            continue;
        }
        let covered = speed
            .batch
            .iter()
            .all(|b| b.as_ref().is_some_and(|b| b.covers(seg.partition, seg.hi)));
        if covered {
            continue;
        }
        let mut events = read_segment(lake, &seg).await?;
        if seg.hi > end {
            // Merged by a compaction with segments not caught up yet: the part caught up.
            let offsets = events
                .column(super::record::OFFSET_COLUMN)?
                .cast(&DataType::UInt64)?;
            let keep = offsets.u64()?.lt(end);
            events = events.filter(&keep)?;
            seg.hi = end;
        }
        let set = sets.of(lookups, &seg).await?;
        let parts = sealed_partials(plan, &events, set).await?;
        absorb_sealed(plan, speed, &seg, events.height(), parts)?;
    }
    Ok(())
}

/// The lookup versions segments recorded, each set loaded once (consecutive segments mostly
/// recorded the same ones).
#[derive(Default)]
struct RecordedSets(Vec<(Option<String>, LookupSet)>);

impl RecordedSets {
    /// The versions segment `seg` was enriched with: the partials it had when sealed.
    async fn of(&mut self, lookups: &Lookups, seg: &state::Segment) -> anyhow::Result<LookupSet> {
        if let Some((_, set)) = self.0.iter().find(|(r, _)| *r == seg.lookups) {
            return Ok(set.clone());
        }
        let set = lookups
            .recorded(seg.lookups.as_deref())
            .await
            .with_context(|| format!("lookup versions of segment {}", seg.path))?;
        self.0.push((seg.lookups.clone(), set.clone()));
        Ok(set)
    }
}

/// A sealed segment's events, from the lake (checked against its manifest row), decoded on
/// the blocking pool — for start-up, a switch of the definition and `as_of` answers alike.
pub async fn read_segment(lake: &Lake, seg: &state::Segment) -> anyhow::Result<DataFrame> {
    let bytes = seg.read(lake).await?;
    let path = seg.path.clone();
    tokio::task::spawn_blocking(move || {
        let events = ParquetReader::new(Cursor::new(bytes)).finish();
        anyhow::Context::with_context(events, || format!("decoding segment {path}"))
    })
    .await?
}

/// The partials by `plan` of a sealed segment's `events`, enriched with `set` — polars work,
/// on the blocking pool, so a long recovery or switch never holds a runtime worker.
async fn sealed_partials(
    plan: &Arc<Plan>,
    events: &DataFrame,
    set: LookupSet,
) -> anyhow::Result<Vec<DataFrame>> {
    let (plan, events) = (plan.clone(), events.clone());
    // Prepared once for every view, not once per view.
    tokio::task::spawn_blocking(move || Ok(plan.partials_all(events, &set)?)).await?
}

/// Absorbs sealed segment `seg`'s partials (of `rows` events) into `speed`.
fn absorb_sealed(
    plan: &Plan,
    speed: &mut SpeedState,
    seg: &state::Segment,
    rows: usize,
    parts: Vec<DataFrame>,
) -> anyhow::Result<()> {
    speed.absorb(plan, seg.partition, seg.lo, seg.hi, rows as u64, parts)?;
    speed.seal(seg.partition, seg.lo, seg.hi);
    Ok(())
}

/// The open segment — the log records at or after `checkpoint` — for the aggregator to absorb
/// before anything is appended; `None` when the log holds none.
pub(super) fn replay(
    plan: &Plan,
    log_dir: &Path,
    checkpoint: u64,
    recent: Option<Recent<'_>>,
) -> anyhow::Result<Option<log::Durable<Batch>>> {
    let replay = log::read_from(log_dir, checkpoint)?;
    if replay.is_empty() {
        return Ok(None);
    }
    let first = replay[0].0;
    let last = replay[replay.len() - 1].0 + 1;
    let events = decode_records(plan, &replay)?;
    if let Some(r) = recent {
        r.admit(&events)?;
    }
    tracing::info!(pipeline = %plan.pipeline().name, from = first, to = last, "replaying write-ahead log");
    // Replayed events keep the arrival times they were logged with (their `_arrival`).
    Ok(Some((
        first..last,
        0,
        Batch {
            events,
            acked: None,
        },
    )))
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

/// The partitions to run of `pipeline`, whose logs are under `log_dir`: `0..partitions`, then
/// those beyond with a log directory left from when it had more (the caller runs those whose
/// log still holds events to archive), in partition order.
pub(super) fn partitions(pipeline: &Pipeline, log_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let mut out: Vec<u32> = (0..pipeline.partitions).collect();
    let dir = log_dir.join(&pipeline.name);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("listing {}", dir.display()))),
    };
    for entry in entries {
        let name = entry?.file_name();
        let partition = name
            .to_str()
            .and_then(|n| n.strip_prefix("p="))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(p) = partition
            && p >= pipeline.partitions
        {
            out.push(p);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Whether the log in `dir` holds a record at or after position `from`.
pub(super) fn holds_from(dir: &Path, from: u64) -> anyhow::Result<bool> {
    Ok(log::end(dir)? > from)
}

/// Before a `serve` without `--node` runs `pipeline` alone (its logs under `log_dir`): refused
/// while a node holds a lease of one of its partitions — both would archive the same
/// positions. The first time after nodes ran it, a partition's log written before is stale:
/// one the nodes archived past starts over at the archive's end (what it held was read again
/// from the broker), one holding events past the archive's end is refused (the nodes may
/// have archived them since, at other positions). Then the leases are taken back
/// ([`State::take_back_leases`]).
pub(super) async fn refuse_beside_nodes(
    db: &State,
    pipeline: &str,
    log_dir: &Path,
) -> anyhow::Result<()> {
    let now = crate::clock::now_ms();
    let leases = db.leases(pipeline).await?;
    if let Some(held) = leases
        .iter()
        .find(|l| l.node.is_some() && l.expires_ms >= now)
    {
        anyhow::bail!(
            "pipeline `{pipeline}`: node `{}` runs its partition {} (`serve --node`); a `serve` without --node would archive the same positions: stop the nodes first (SIGTERM hands their partitions over), or start this one as a node too (`serve --node NAME`)",
            held.node.as_deref().unwrap_or_default(),
            held.partition
        );
    }
    for lease in leases.iter().filter(|l| l.expires_ms >= 0) {
        let dir = log_dir
            .join(pipeline)
            .join(format!("p={}", lease.partition));
        let checkpoint = db.checkpoint(pipeline, lease.partition).await?.unwrap_or(0);
        if !dir.exists() {
            continue;
        }
        let end = log::end(&dir)?;
        if end < checkpoint {
            // The nodes archived past all it holds (read again from the broker): it starts
            // over at the archive's end.
            tracing::info!(%pipeline, partition = lease.partition, log_end = end, checkpoint, "nodes archived past this server's write-ahead log; it starts over at the checkpoint");
            start_log_over(&dir, checkpoint)?;
        } else if end > checkpoint {
            anyhow::bail!(
                "pipeline `{pipeline}`: nodes ran partition {} since this server's write-ahead log {} was written, and the log holds events past the archive's end ({checkpoint}) that they may have archived since (read again from the broker): delete {} to go on from the archive — the broker delivers again what no segment holds",
                lease.partition,
                dir.display(),
                dir.display()
            );
        }
    }
    db.take_back_leases(pipeline, now).await?;
    Ok(())
}

/// On a node (`serve --node`), a partition's log at start: empty, continuing at the
/// checkpoint. What it held beyond the checkpoint was never archived nor acknowledged to the
/// broker: whichever node takes the partition reads it from the broker again.
pub(super) fn start_log_over(dir: &Path, checkpoint: u64) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("emptying {}", dir.display())));
        }
    }
    crate::fsync::create_dir_all(dir)?;
    crate::fsync::create_file(&dir.join(format!("{checkpoint:020}.wal")))?;
    Ok(())
}

/// A segment another node sealed, for a node that does not run its partition: its events
/// from position `from` on (a compaction may have merged it with segments absorbed already),
/// their partials by `plan` with the lookup versions it recorded and their count; the ids
/// that arrived recently go into `recent`'s index (so a copy reaching this node later is
/// dropped). `None` when it holds nothing from `from` on.
pub(super) async fn foreign_segment(
    plan: &Arc<Plan>,
    lookups: &Lookups,
    lake: &Lake,
    seg: &state::Segment,
    from: u64,
    recent: Option<Recent<'_>>,
) -> anyhow::Result<Option<(u64, Vec<DataFrame>)>> {
    let mut events = read_segment(lake, seg).await?;
    if seg.lo < from {
        let offsets = events
            .column(super::record::OFFSET_COLUMN)?
            .cast(&DataType::UInt64)?;
        let keep = offsets.u64()?.gt_eq(from);
        events = events.filter(&keep)?;
    }
    if events.height() == 0 {
        return Ok(None);
    }
    if let Some(r) = recent {
        r.admit(&events)?;
    }
    let set = lookups
        .recorded(seg.lookups.as_deref())
        .await
        .with_context(|| format!("lookup versions of segment {}", seg.path))?;
    let rows = events.height() as u64;
    let parts = sealed_partials(plan, &events, set).await?;
    Ok(Some((rows, parts)))
}

/// A log directory that has lost its files (or is new) must continue at the checkpoint, so
/// positions are never reused.
pub(super) fn ensure_log_starts_at(dir: &Path, checkpoint: u64) -> anyhow::Result<()> {
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
    use super::*;

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
