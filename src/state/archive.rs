//! The archive manifest (DESIGN.md §1): sealed segments, per-partition checkpoints and the
//! dead-letter counters that move with them.

use std::collections::BTreeMap;

use super::{State, StateError, db, from_db, now, to_db};

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
    /// Events of `[lo, hi)` rejected into the dead-letter area instead of the segment.
    pub dead_letters: u64,
    /// Event-time range of the rows (epoch ms); `None` when the segment has no rows.
    pub min_event_ms: Option<i64>,
    pub max_event_ms: Option<i64>,
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
                          min_event_ms, max_event_ms, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

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
    pub async fn seal_segment(&self, segment: &Segment) -> Result<(), StateError> {
        let s = segment;
        if s.lo >= s.hi {
            return Err(StateError::EmptySegment {
                pipeline: s.pipeline.clone(),
                partition: s.partition,
                lo: s.lo,
                hi: s.hi,
            });
        }
        let (lo, hi) = (to_db("position", s.lo)?, to_db("position", s.hi)?);
        let rows = to_db("row count", s.rows)?;
        let bytes = to_db("byte count", s.bytes)?;
        let dead = to_db("dead-letter count", s.dead_letters)?;
        let partition = i64::from(s.partition);
        let at = now();
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(db("seal segment"))?;
            // The checkpoint update comes first: it is the write that takes the lock (module docs).
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
                .execute(&mut *tx)
                .await
                .map_err(db("seal segment: insert manifest row"))?;
            if dead > 0 {
                sqlx::query(COUNT_DEAD_LETTERS)
                    .bind(&s.pipeline)
                    .bind(dead)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("seal segment: count dead letters"))?;
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
                   min_event_ms, max_event_ms
            FROM segments WHERE pipeline = $1 ORDER BY partition, lo";
        let rows: Vec<SegmentRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("list segments"))?;
        rows.into_iter().map(SegmentRow::into_segment).collect()
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
