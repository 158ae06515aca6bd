//! The archive manifest (DESIGN.md §1): sealed segments, per-partition checkpoints and the
//! dead-letter counters that move with them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::leases::{FENCE, RECORD_SOURCE_OFFSET};
use super::ledger::{EntryParams, INSERT_ENTRY, bind_entry};
use super::{BeginWrite, Fence, LedgerEntry, RunId, State, StateError, db, from_db, now, to_db};

/// A sealed Parquet segment: positions `[lo, hi)` of one pipeline partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub pipeline: String,
    pub partition: u32,
    pub lo: u64,
    pub hi: u64,
    /// Object path relative to the lake root (`lake::archive_path`).
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Events rejected into the dead-letter area since the previous segment was sealed
    /// (rejected events get no position: they are not part of `[lo, hi)`).
    pub dead_letters: u64,
    /// Event-time range of the rows (epoch ms); `None` when the segment has no rows.
    pub min_event_ms: Option<i64>,
    pub max_event_ms: Option<i64>,
    /// The lookup versions its events were enriched with (`plan::LookupSet::record`, JSON
    /// `{"LOOKUP": "VERSION"}`); `None` for a pipeline without lookups.
    pub lookups: Option<String>,
    /// CRC-32 (IEEE, [`crc32fast`]) of the Parquet file's bytes as written; `None` for
    /// segments sealed before it was recorded. Readers that check it: `verify`, compaction.
    pub crc32: Option<u32>,
}

impl Segment {
    /// Whether `bytes` are this segment's file as sealed: its size and, when recorded, its
    /// CRC-32. `Err` says what differs.
    pub fn check_bytes(&self, bytes: &[u8]) -> Result<(), String> {
        // 0: not known (a scaled-out job queued before it carried the size); no file is empty.
        if self.bytes != 0 && bytes.len() as u64 != self.bytes {
            return Err(format!(
                "segment {} has {} bytes in the lake, {} in the manifest",
                self.path,
                bytes.len(),
                self.bytes
            ));
        }
        match self.crc32 {
            Some(want) if crc32fast::hash(bytes) != want => Err(format!(
                "segment {} does not match its checksum (CRC-32 {:08x} in the lake, {want:08x} in the manifest)",
                self.path,
                crc32fast::hash(bytes)
            )),
            _ => Ok(()),
        }
    }

    /// The segment's file from `lake`, checked against this manifest row (size, and CRC-32
    /// when recorded): no reader decodes a damaged file (a parquet reader trusts its bytes).
    pub async fn read(&self, lake: &crate::lake::Lake) -> anyhow::Result<bytes::Bytes> {
        let bytes = anyhow::Context::with_context(lake.get(&self.path).await, || {
            format!("reading segment {}", self.path)
        })?;
        self.check_bytes(&bytes).map_err(damaged)?;
        Ok(bytes)
    }

    /// [`Segment::read`]'s check of the segment's file at `path` on a `file://` lake, which a
    /// reader then scans itself. Blocking.
    pub fn check_file(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("reading segment {} ({}): {e}", self.path, path.display())
        })?;
        self.check_bytes(&bytes).map_err(damaged)
    }
}

/// A damaged segment, as an error that says what to do.
fn damaged(problem: String) -> anyhow::Error {
    anyhow::anyhow!(
        "{problem}: the archive is damaged; restore the file from a copy of the lake (`lambda-ctl verify PIPELINE` names every damaged segment)"
    )
}

#[derive(sqlx::FromRow)]
struct SegmentRow {
    pipeline: String,
    partition: i64,
    lo: i64,
    hi: i64,
    path: String,
    row_count: i64,
    bytes: i64,
    dead_letters: i64,
    min_event_ms: Option<i64>,
    max_event_ms: Option<i64>,
    lookups: Option<String>,
    crc32: Option<i64>,
}

impl SegmentRow {
    fn into_segment(self) -> Result<Segment, StateError> {
        Ok(Segment {
            pipeline: self.pipeline,
            partition: from_db("partition", self.partition)?,
            lo: from_db("position", self.lo)?,
            hi: from_db("position", self.hi)?,
            path: self.path,
            rows: from_db("row count", self.row_count)?,
            bytes: from_db("byte count", self.bytes)?,
            dead_letters: from_db("dead-letter count", self.dead_letters)?,
            min_event_ms: self.min_event_ms,
            max_event_ms: self.max_event_ms,
            lookups: self.lookups,
            crc32: self.crc32.map(|c| from_db("checksum", c)).transpose()?,
        })
    }
}

/// Moves the checkpoint from `$3` (the segment's `lo`) to `$4` (its `hi`). The first segment of
/// a partition creates the row whatever its `lo`: a source's positions need not start at 0
/// (Kafka after retention). Zero rows changed = the checkpoint was elsewhere.
const ADVANCE_CHECKPOINT: &str = "
    INSERT INTO checkpoints (pipeline, partition, position, updated_at) VALUES ($1, $2, $4, $5)
    ON CONFLICT (pipeline, partition) DO UPDATE
        SET position = excluded.position, updated_at = excluded.updated_at
        WHERE checkpoints.position = $3";

const INSERT_SEGMENT: &str = "
    INSERT INTO segments (pipeline, partition, lo, hi, path, row_count, bytes, dead_letters,
                          min_event_ms, max_event_ms, created_at, lookups, crc32)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

const COUNT_DEAD_LETTERS: &str = "
    INSERT INTO dead_letters (pipeline, total, updated_at) VALUES ($1, $2, $3)
    ON CONFLICT (pipeline) DO UPDATE
        SET total = dead_letters.total + excluded.total, updated_at = excluded.updated_at";

const SELECT_CHECKPOINT: &str =
    "SELECT position FROM checkpoints WHERE pipeline = $1 AND partition = $2";

impl State {
    /// Records a sealed segment: inserts its manifest row, advances the partition's checkpoint
    /// from `lo` to `hi` and adds its dead letters to the pipeline's counter, in ONE transaction
    /// (DESIGN.md §1). Acknowledge upstream only after this returns `Ok`.
    ///
    /// Fails with [`StateError::NotContiguous`] (and changes nothing) unless the checkpoint is
    /// exactly `lo` — or the partition has none yet — so two archivers, or a replay after a
    /// crash, can never record overlapping segments.
    ///
    /// Fails with [`StateError::IncompleteSegment`] (and changes nothing) unless the segment
    /// holds exactly one row per position: every position is an event in the segment (events
    /// rejected or dropped as duplicates never get one).
    pub async fn seal_segment(&self, segment: &Segment) -> Result<(), StateError> {
        self.seal_segment_restating(segment, &[]).await
    }

    /// [`State::seal_segment`], recording in the same transaction the ledger entries of the
    /// windows the segment's late events restated: a segment's restatements are recorded
    /// exactly when the segment is.
    pub async fn seal_segment_restating(
        &self,
        segment: &Segment,
        restated: &[LedgerEntry],
    ) -> Result<(), StateError> {
        self.seal_segment_fenced(segment, restated, None, &BTreeMap::new())
            .await
    }

    /// [`State::seal_segment_restating`] by a node holding the partition's lease (`fence`), and
    /// recording where a broker source resumes the partition (`offsets`: the next offset of
    /// each source partition after the segment's messages), in the same transaction.
    ///
    /// With a fence, fails with [`StateError::Fenced`] (and changes nothing) unless `fence.node`
    /// still holds the lease at `fence.epoch`: a node that lost its partition (paused past its
    /// lease's expiry, then resumed) cannot record a segment beside its new holder's, even when
    /// the positions would follow. The check is the transaction's first statement, a write
    /// that holds the lease row until commit, so a takeover happens wholly before or after the
    /// seal. `None`: a single process owns every partition (no leases).
    ///
    /// The offsets are recorded with the segment holding the messages before them, never
    /// moved backwards: the partition's next holder resumes the source exactly after the last
    /// segment recorded, neither skipping nor repeating a message.
    pub async fn seal_segment_fenced(
        &self,
        segment: &Segment,
        restated: &[LedgerEntry],
        fence: Option<&Fence>,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), StateError> {
        let s = segment;
        let entries = restated
            .iter()
            .map(EntryParams::of)
            .collect::<Result<Vec<_>, _>>()?;
        if s.lo >= s.hi {
            return Err(StateError::EmptySegment {
                pipeline: s.pipeline.clone(),
                partition: s.partition,
                lo: s.lo,
                hi: s.hi,
            });
        }
        if s.rows != s.hi - s.lo {
            return Err(StateError::IncompleteSegment {
                pipeline: s.pipeline.clone(),
                partition: s.partition,
                lo: s.lo,
                hi: s.hi,
                rows: s.rows,
            });
        }
        let (lo, hi) = (to_db("position", s.lo)?, to_db("position", s.hi)?);
        let rows = to_db("row count", s.rows)?;
        let bytes = to_db("byte count", s.bytes)?;
        let dead = to_db("dead-letter count", s.dead_letters)?;
        let partition = i64::from(s.partition);
        let fence = fence
            .map(|f| to_db("lease epoch", f.epoch).map(|epoch| (f, epoch)))
            .transpose()?;
        let at = now();
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("seal segment"))?;
            // The fence, else the checkpoint update, comes first: it is the write that takes the
            // lock (module docs).
            if let Some((f, epoch)) = fence {
                let held = sqlx::query(FENCE)
                    .bind(&s.pipeline)
                    .bind(partition)
                    .bind(&f.node)
                    .bind(epoch)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("seal segment: check the partition's lease"))?
                    .rows_affected();
                if held == 0 {
                    return Err(StateError::Fenced {
                        pipeline: s.pipeline.clone(),
                        partition: s.partition,
                        node: f.node.clone(),
                        epoch: f.epoch,
                    });
                }
            }
            let advanced = sqlx::query(ADVANCE_CHECKPOINT)
                .bind(&s.pipeline)
                .bind(partition)
                .bind(lo)
                .bind(hi)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(db("seal segment: advance checkpoint"))?
                .rows_affected();
            if advanced == 0 {
                let (position,): (i64,) = sqlx::query_as(SELECT_CHECKPOINT)
                    .bind(&s.pipeline)
                    .bind(partition)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("seal segment: read checkpoint"))?;
                return Err(StateError::NotContiguous {
                    pipeline: s.pipeline.clone(),
                    partition: s.partition,
                    lo: s.lo,
                    checkpoint: from_db("position", position)?,
                });
            }
            sqlx::query(INSERT_SEGMENT)
                .bind(&s.pipeline)
                .bind(partition)
                .bind(lo)
                .bind(hi)
                .bind(&s.path)
                .bind(rows)
                .bind(bytes)
                .bind(dead)
                .bind(s.min_event_ms)
                .bind(s.max_event_ms)
                .bind(at)
                .bind(&s.lookups)
                .bind(s.crc32.map(i64::from))
                .execute(&mut *tx)
                .await
                .map_err(db("seal segment: insert manifest row"))?;
            for e in &entries {
                bind_entry!(sqlx::query(INSERT_ENTRY), e)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("seal segment: record restated windows"))?;
            }
            if dead > 0 {
                sqlx::query(COUNT_DEAD_LETTERS)
                    .bind(&s.pipeline)
                    .bind(dead)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("seal segment: count dead letters"))?;
            }
            for (source, offset) in offsets {
                sqlx::query(RECORD_SOURCE_OFFSET)
                    .bind(&s.pipeline)
                    .bind(partition)
                    .bind(i64::from(*source))
                    .bind(*offset)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("seal segment: record source offsets"))?;
            }
            tx.commit().await.map_err(db("seal segment: commit"))
        })?;
        tracing::debug!(
            pipeline = %s.pipeline, partition = s.partition, lo = s.lo, hi = s.hi, rows = s.rows,
            "recorded sealed segment"
        );
        Ok(())
    }

    /// Every sealed segment of `pipeline`, by partition then position.
    pub async fn segments(&self, pipeline: &str) -> Result<Vec<Segment>, StateError> {
        const SQL: &str = "
            SELECT pipeline, partition, lo, hi, path, row_count, bytes, dead_letters,
                   min_event_ms, max_event_ms, lookups, crc32
            FROM segments WHERE pipeline = $1 ORDER BY partition, lo";
        let rows: Vec<SegmentRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("list segments"))?;
        rows.into_iter().map(SegmentRow::into_segment).collect()
    }

    /// Records `lookups` (a `plan::LookupSet::record`) as the versions of every segment of
    /// `segments` of `pipeline` (`lambda-ctl run --refresh-lookups`: history recomputed with
    /// the current tables, from then on by every run and by recovery) and that run `run_id`
    /// restated the pipeline's history (see [`State::restated_by`]), in ONE transaction. Fails
    /// with [`StateError::ArchiveRaced`], changing nothing, when one of them is no longer in
    /// the manifest (compacted or dropped meanwhile).
    pub async fn record_lookups(
        &self,
        pipeline: &str,
        run_id: RunId,
        segments: &[Segment],
        lookups: Option<&str>,
    ) -> Result<(), StateError> {
        const SQL: &str = "UPDATE segments SET lookups = $5
            WHERE pipeline = $1 AND partition = $2 AND lo = $3 AND hi = $4";
        const RESTATED: &str = "INSERT INTO restatements
            (pipeline, run_id, lookups, segments, created_at) VALUES ($1, $2, $3, $4, $5)";
        let count = to_db("segment count", segments.len() as u64)?;
        on_pool!(self, |pool| {
            let mut tx = pool
                .begin_write()
                .await
                .map_err(db("record lookup versions"))?;
            sqlx::query(RESTATED)
                .bind(pipeline)
                .bind(run_id.0)
                .bind(lookups)
                .bind(count)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(db("record lookup versions: restatement"))?;
            for s in segments {
                let changed = sqlx::query(SQL)
                    .bind(&s.pipeline)
                    .bind(i64::from(s.partition))
                    .bind(to_db("position", s.lo)?)
                    .bind(to_db("position", s.hi)?)
                    .bind(lookups)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("record lookup versions"))?
                    .rows_affected();
                if changed != 1 {
                    return Err(StateError::ArchiveRaced {
                        pipeline: s.pipeline.clone(),
                        partition: s.partition,
                        lo: s.lo,
                    });
                }
            }
            tx.commit()
                .await
                .map_err(db("record lookup versions: commit"))
        })
    }

    /// The latest run that restated `pipeline`'s history ([`State::record_lookups`]); `None`
    /// when none did. A view published by an earlier run was computed with lookup versions
    /// its segments no longer record, so the batch layer recomputes it from every segment
    /// instead of building on it.
    pub async fn restated_by(&self, pipeline: &str) -> Result<Option<RunId>, StateError> {
        const SQL: &str = "SELECT MAX(run_id) FROM restatements WHERE pipeline = $1";
        let (id,): (Option<i64>,) = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_one(pool)
            .await)
        .map_err(db("read restatements"))?;
        Ok(id.map(RunId))
    }

    /// The next position of `partition` not yet sealed; `None` before its first segment.
    pub async fn checkpoint(
        &self,
        pipeline: &str,
        partition: u32,
    ) -> Result<Option<u64>, StateError> {
        let position: Option<(i64,)> = on_pool!(self, |pool| sqlx::query_as(SELECT_CHECKPOINT)
            .bind(pipeline)
            .bind(i64::from(partition))
            .fetch_optional(pool)
            .await)
        .map_err(db("read checkpoint"))?;
        position.map(|(p,)| from_db("position", p)).transpose()
    }

    /// Every partition's checkpoint, read in one statement: a consistent cutoff for a batch run
    /// (everything below it is sealed).
    pub async fn checkpoints(&self, pipeline: &str) -> Result<BTreeMap<u32, u64>, StateError> {
        const SQL: &str = "SELECT partition, position FROM checkpoints WHERE pipeline = $1";
        let rows: Vec<(i64, i64)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("read checkpoints"))?;
        rows.into_iter()
            .map(|(partition, position)| {
                Ok((
                    from_db("partition", partition)?,
                    from_db("position", position)?,
                ))
            })
            .collect()
    }

    /// Events of `pipeline` rejected into the dead-letter area, over all sealed segments.
    pub async fn dead_letters(&self, pipeline: &str) -> Result<u64, StateError> {
        const SQL: &str = "SELECT total FROM dead_letters WHERE pipeline = $1";
        let total: Option<(i64,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_optional(pool)
            .await)
        .map_err(db("read dead-letter count"))?;
        total.map_or(Ok(0), |(t,)| from_db("dead-letter count", t))
    }
}

/// A lake object the manifest no longer references, waiting for its grace period to pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredObject {
    pub path: String,
    pub pipeline: String,
    pub reason: String,
    pub retired_at: DateTime<Utc>,
}

/// Deletes one manifest row, only if it is still exactly the segment the caller read.
const DELETE_SEGMENT: &str = "
    DELETE FROM segments
    WHERE pipeline = $1 AND partition = $2 AND lo = $3 AND hi = $4 AND path = $5";

const RETIRE_OBJECT: &str = "
    INSERT INTO retired_objects (path, pipeline, reason, retired_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (path) DO NOTHING";

/// Inside an `on_pool!` body: deletes manifest row `$s` (exactly as read) and retires its file
/// in transaction `$tx`; returns [`StateError::ArchiveRaced`] from the body when it is gone.
macro_rules! retire_segment {
    ($tx:expr, $s:expr, $reason:expr, $at:expr) => {{
        let s: &Segment = $s;
        let deleted = sqlx::query(DELETE_SEGMENT)
            .bind(&s.pipeline)
            .bind(i64::from(s.partition))
            .bind(to_db("position", s.lo)?)
            .bind(to_db("position", s.hi)?)
            .bind(&s.path)
            .execute(&mut *$tx)
            .await
            .map_err(db("delete segment"))?
            .rows_affected();
        if deleted != 1 {
            return Err(StateError::ArchiveRaced {
                pipeline: s.pipeline.clone(),
                partition: s.partition,
                lo: s.lo,
            });
        }
        sqlx::query(RETIRE_OBJECT)
            .bind(&s.path)
            .bind(&s.pipeline)
            .bind($reason)
            .bind($at)
            .execute(&mut *$tx)
            .await
            .map_err(db("retire segment file"))?;
    }};
}

impl State {
    /// Compaction's manifest swap: `old` (contiguous segments of one partition) leave the
    /// manifest and `new` (their union, already written to the lake) takes their place, in ONE
    /// transaction; the old files are retired, not deleted (a running batch run may still read
    /// them). Fails with [`StateError::ArchiveRaced`], changing nothing, when any of `old` is
    /// no longer in the manifest as read.
    pub async fn replace_segments(&self, old: &[Segment], new: &Segment) -> Result<(), StateError> {
        let first = old.first().ok_or(StateError::EmptySegment {
            pipeline: new.pipeline.clone(),
            partition: new.partition,
            lo: new.lo,
            hi: new.lo,
        })?;
        let (lo, hi) = (first.lo, old.last().map_or(first.hi, |s| s.hi));
        let contiguous = old.windows(2).all(|w| w[0].hi == w[1].lo);
        let same_partition = old
            .iter()
            .all(|s| s.pipeline == new.pipeline && s.partition == new.partition);
        if !contiguous || !same_partition || (new.lo, new.hi) != (lo, hi) {
            return Err(StateError::Corrupt {
                what: "compaction (segments not contiguous or not covering the merged range)",
                value: format!("{}/p={} [{lo}, {hi})", new.pipeline, new.partition),
            });
        }
        let at = now();
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("compact segments"))?;
            for s in old {
                retire_segment!(tx, s, "compacted", at);
            }
            sqlx::query(INSERT_SEGMENT)
                .bind(&new.pipeline)
                .bind(i64::from(new.partition))
                .bind(to_db("position", new.lo)?)
                .bind(to_db("position", new.hi)?)
                .bind(&new.path)
                .bind(to_db("row count", new.rows)?)
                .bind(to_db("byte count", new.bytes)?)
                .bind(to_db("dead-letter count", new.dead_letters)?)
                .bind(new.min_event_ms)
                .bind(new.max_event_ms)
                .bind(at)
                .bind(&new.lookups)
                .bind(new.crc32.map(i64::from))
                .execute(&mut *tx)
                .await
                .map_err(db("compact segments: insert merged segment"))?;
            tx.commit().await.map_err(db("compact segments: commit"))
        })?;
        tracing::info!(
            pipeline = %new.pipeline, partition = new.partition, lo, hi, replaced = old.len(),
            "compacted segments"
        );
        Ok(())
    }

    /// Retention: `segments` leave the manifest and their files are retired, in ONE transaction.
    /// The checkpoints do not move (positions are never reused). Fails with
    /// [`StateError::ArchiveRaced`], changing nothing, when one of them is already gone.
    pub async fn drop_segments(&self, segments: &[Segment]) -> Result<(), StateError> {
        if segments.is_empty() {
            return Ok(());
        }
        let at = now();
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("drop segments"))?;
            for s in segments {
                retire_segment!(tx, s, "retention", at);
            }
            tx.commit().await.map_err(db("drop segments: commit"))
        })
    }

    /// When each segment of `pipeline` was sealed, by (partition, lo).
    pub async fn sealed_at(
        &self,
        pipeline: &str,
    ) -> Result<BTreeMap<(u32, u64), DateTime<Utc>>, StateError> {
        const SQL: &str = "SELECT partition, lo, created_at FROM segments WHERE pipeline = $1";
        let rows: Vec<(i64, i64, DateTime<Utc>)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("read segment seal times"))?;
        rows.into_iter()
            .map(|(p, lo, at)| Ok(((from_db("partition", p)?, from_db("position", lo)?), at)))
            .collect()
    }

    /// Retired objects of `pipeline` retired before `before`, oldest first.
    pub async fn retired_objects(
        &self,
        pipeline: &str,
        before: DateTime<Utc>,
    ) -> Result<Vec<RetiredObject>, StateError> {
        const SQL: &str = "
            SELECT path, pipeline, reason, retired_at FROM retired_objects
            WHERE pipeline = $1 AND retired_at < $2 ORDER BY retired_at, path";
        let rows: Vec<(String, String, String, DateTime<Utc>)> =
            on_pool!(self, |pool| sqlx::query_as(SQL)
                .bind(pipeline)
                .bind(before)
                .fetch_all(pool)
                .await)
            .map_err(db("list retired objects"))?;
        Ok(rows
            .into_iter()
            .map(|(path, pipeline, reason, retired_at)| RetiredObject {
                path,
                pipeline,
                reason,
                retired_at,
            })
            .collect())
    }

    /// Forgets a retired object once its file is gone from the lake.
    pub async fn forget_retired(&self, path: &str) -> Result<(), StateError> {
        const SQL: &str = "DELETE FROM retired_objects WHERE path = $1";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(path)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("forget retired object"))?;
        Ok(())
    }
}
