//! The restatement ledger: every window and group whose served value changed after it was
//! served — by late events, one entry per sealed segment that had some, written in the
//! transaction that records the segment ([`State::seal_segment_restating`]); or by a batch
//! publication that restated history, written by the server that switched to it
//! ([`State::record_restated`], once per publication, window and group). Read back per view
//! over a time range, and summed per view for `/metrics` and `status`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{BeginWrite, PublicationId, RunId, State, StateError, db, from_db, to_db};

/// What restated a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Late events of the sealed segment `[lo, hi)` of `partition`.
    Late { partition: u32, lo: u64, hi: u64 },
    /// A batch publication that restated history: a run with refreshed lookups, or a promote
    /// that switched the view to a version of another definition.
    Publication {
        run_id: RunId,
        publication: PublicationId,
    },
}

impl Cause {
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Late { .. } => "late",
            Cause::Publication { .. } => "publication",
        }
    }
}

/// One restated window and group of a view.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    pub pipeline: String,
    pub view: String,
    pub cause: Cause,
    /// The window; `None` for the all-time window.
    pub window_start_ms: Option<i64>,
    pub window_end_ms: Option<i64>,
    /// group_by column → value.
    pub key: Map<String, Value>,
    /// Events of the cause that arrived at or after the window's end (0 for a publication).
    pub late_events: u64,
    /// arrival − window end of the latest of them.
    pub max_lateness_ms: i64,
    /// metric → `{"before", "after", "delta"}`.
    pub metrics: Map<String, Value>,
    pub recorded_at_ms: i64,
}

impl LedgerEntry {
    /// The entry of `row`, a window and group of `pipeline.view` that `cause` restated,
    /// recorded at `recorded_at_ms`.
    pub fn of(
        (pipeline, view): (&str, &str),
        cause: Cause,
        row: crate::plan::Restated,
        recorded_at_ms: i64,
    ) -> LedgerEntry {
        LedgerEntry {
            pipeline: pipeline.to_string(),
            view: view.to_string(),
            cause,
            window_start_ms: row.window_start_ms,
            window_end_ms: row.window_end_ms,
            key: row.key,
            late_events: row.late_events,
            max_lateness_ms: row.max_lateness_ms,
            metrics: row.metrics,
            recorded_at_ms,
        }
    }
}

/// A view's ledger, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerTotals {
    pub late_events: u64,
    /// Entries: a window restated by two segments counts twice.
    pub restated_windows: u64,
    /// Largest lateness recorded (ms).
    pub max_lateness_ms: i64,
}

#[derive(sqlx::FromRow)]
struct EntryRow {
    pipeline: String,
    view: String,
    cause: String,
    partition: Option<i64>,
    segment_lo: Option<i64>,
    segment_hi: Option<i64>,
    run_id: Option<i64>,
    publication_id: Option<i64>,
    window_start_ms: Option<i64>,
    window_end_ms: Option<i64>,
    group_key: String,
    late_events: i64,
    max_lateness_ms: i64,
    metrics: String,
    recorded_at_ms: i64,
}

impl EntryRow {
    fn into_entry(self) -> Result<LedgerEntry, StateError> {
        let object = |what: &'static str, text: &str| match serde_json::from_str(text) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(StateError::Corrupt {
                what,
                value: text.to_string(),
            }),
        };
        let corrupt = || StateError::Corrupt {
            what: "ledger cause",
            value: format!(
                "{} (partition {:?}, segment {:?}..{:?}, run {:?}, publication {:?})",
                self.cause,
                self.partition,
                self.segment_lo,
                self.segment_hi,
                self.run_id,
                self.publication_id
            ),
        };
        let cause = match (
            self.cause.as_str(),
            self.partition,
            self.segment_lo,
            self.segment_hi,
            self.run_id,
            self.publication_id,
        ) {
            ("late", Some(p), Some(lo), Some(hi), _, _) => Cause::Late {
                partition: u32::try_from(p).map_err(|_| corrupt())?,
                lo: from_db("position", lo)?,
                hi: from_db("position", hi)?,
            },
            ("publication", _, _, _, Some(run), Some(publication)) => Cause::Publication {
                run_id: RunId(run),
                publication: PublicationId(publication),
            },
            _ => return Err(corrupt()),
        };
        Ok(LedgerEntry {
            key: object("ledger group key", &self.group_key)?,
            metrics: object("ledger metrics", &self.metrics)?,
            pipeline: self.pipeline,
            view: self.view,
            cause,
            window_start_ms: self.window_start_ms,
            window_end_ms: self.window_end_ms,
            late_events: from_db("late event count", self.late_events)?,
            max_lateness_ms: self.max_lateness_ms,
            recorded_at_ms: self.recorded_at_ms,
        })
    }
}

pub(super) const INSERT_ENTRY: &str = "
    INSERT INTO ledger
        (pipeline, view, cause, partition, segment_lo, segment_hi, run_id, publication_id,
         window_start_ms, window_end_ms, group_key, late_events, max_lateness_ms, metrics,
         recorded_at_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
    ON CONFLICT (publication_id, COALESCE(window_start_ms, -1), group_key)
        WHERE publication_id IS NOT NULL
    DO NOTHING";

/// An entry as [`INSERT_ENTRY`] binds it, in order.
pub(super) struct EntryParams {
    pub pipeline: String,
    pub view: String,
    pub cause: &'static str,
    pub partition: Option<i64>,
    pub segment_lo: Option<i64>,
    pub segment_hi: Option<i64>,
    pub run_id: Option<i64>,
    pub publication_id: Option<i64>,
    pub window_start_ms: Option<i64>,
    pub window_end_ms: Option<i64>,
    pub group_key: String,
    pub late_events: i64,
    pub max_lateness_ms: i64,
    pub metrics: String,
    pub recorded_at_ms: i64,
}

/// Binds [`EntryParams`] `$e` to `$query` (an [`INSERT_ENTRY`]), on either backend.
macro_rules! bind_entry {
    ($query:expr, $e:expr) => {{
        let e: &$crate::state::ledger::EntryParams = $e;
        $query
            .bind(&e.pipeline)
            .bind(&e.view)
            .bind(e.cause)
            .bind(e.partition)
            .bind(e.segment_lo)
            .bind(e.segment_hi)
            .bind(e.run_id)
            .bind(e.publication_id)
            .bind(e.window_start_ms)
            .bind(e.window_end_ms)
            .bind(&e.group_key)
            .bind(e.late_events)
            .bind(e.max_lateness_ms)
            .bind(&e.metrics)
            .bind(e.recorded_at_ms)
    }};
}
pub(super) use bind_entry;

impl EntryParams {
    pub(super) fn of(e: &LedgerEntry) -> Result<EntryParams, StateError> {
        let (mut partition, mut lo, mut hi, mut run_id, mut publication_id) =
            (None, None, None, None, None);
        match e.cause {
            Cause::Late {
                partition: p,
                lo: l,
                hi: h,
            } => {
                partition = Some(i64::from(p));
                lo = Some(to_db("position", l)?);
                hi = Some(to_db("position", h)?);
            }
            Cause::Publication {
                run_id: r,
                publication: id,
            } => {
                run_id = Some(r.0);
                publication_id = Some(id.0);
            }
        }
        Ok(EntryParams {
            pipeline: e.pipeline.clone(),
            view: e.view.clone(),
            cause: e.cause.as_str(),
            partition,
            segment_lo: lo,
            segment_hi: hi,
            run_id,
            publication_id,
            window_start_ms: e.window_start_ms,
            window_end_ms: e.window_end_ms,
            group_key: Value::Object(e.key.clone()).to_string(),
            late_events: to_db("late event count", e.late_events)?,
            max_lateness_ms: e.max_lateness_ms,
            metrics: Value::Object(e.metrics.clone()).to_string(),
            recorded_at_ms: e.recorded_at_ms,
        })
    }
}

impl State {
    /// Records `entries` in one transaction. The entries of a publication are recorded once:
    /// when it already has some (another server recorded it), they are skipped.
    pub async fn record_restated(&self, entries: &[LedgerEntry]) -> Result<(), StateError> {
        const RECORDED: &str = "SELECT COUNT(*) FROM ledger WHERE publication_id = $1";
        let entries = entries
            .iter()
            .map(EntryParams::of)
            .collect::<Result<Vec<_>, _>>()?;
        let mut publications: Vec<i64> = entries.iter().filter_map(|e| e.publication_id).collect();
        publications.sort_unstable();
        publications.dedup();
        on_pool!(self, |pool| {
            let mut tx = pool
                .begin_write()
                .await
                .map_err(db("record restated windows"))?;
            let mut recorded = Vec::new();
            for id in &publications {
                let (n,): (i64,) = sqlx::query_as(RECORDED)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("record restated windows: read"))?;
                if n > 0 {
                    recorded.push(*id);
                }
            }
            for e in entries
                .iter()
                .filter(|e| e.publication_id.is_none_or(|id| !recorded.contains(&id)))
            {
                bind_entry!(sqlx::query(INSERT_ENTRY), e)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("record restated windows"))?;
            }
            tx.commit()
                .await
                .map_err(db("record restated windows: commit"))
        })
    }

    /// The entries of `view` of `pipeline` recorded in `[from_ms, to_ms)` (either bound
    /// open), oldest first, at most `limit`.
    pub async fn ledger(
        &self,
        pipeline: &str,
        view: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        limit: u64,
    ) -> Result<Vec<LedgerEntry>, StateError> {
        const SQL: &str = "
            SELECT pipeline, view, cause, partition, segment_lo, segment_hi, run_id,
                   publication_id, window_start_ms, window_end_ms, group_key, late_events,
                   max_lateness_ms, metrics, recorded_at_ms
            FROM ledger
            WHERE pipeline = $1 AND view = $2
              AND ($3 IS NULL OR recorded_at_ms >= $3) AND ($4 IS NULL OR recorded_at_ms < $4)
            ORDER BY id LIMIT $5";
        let limit = to_db("limit", limit)?;
        let rows: Vec<EntryRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .bind(from_ms)
            .bind(to_ms)
            .bind(limit)
            .fetch_all(pool)
            .await)
        .map_err(db("read the restatement ledger"))?;
        rows.into_iter().map(EntryRow::into_entry).collect()
    }

    /// Per view of `pipeline` with entries, and recorded in `[from_ms, to_ms)` (either bound
    /// open): the ledger summed.
    pub async fn ledger_totals(
        &self,
        pipeline: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<BTreeMap<String, LedgerTotals>, StateError> {
        const SQL: &str = "
            SELECT view, CAST(SUM(late_events) AS BIGINT), CAST(COUNT(*) AS BIGINT),
                   CAST(MAX(max_lateness_ms) AS BIGINT)
            FROM ledger
            WHERE pipeline = $1
              AND ($2 IS NULL OR recorded_at_ms >= $2) AND ($3 IS NULL OR recorded_at_ms < $3)
            GROUP BY view";
        let rows: Vec<(String, i64, i64, i64)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await)
        .map_err(db("sum the restatement ledger"))?;
        rows.into_iter()
            .map(|(view, late, windows, lateness)| {
                Ok((
                    view,
                    LedgerTotals {
                        late_events: from_db("late event count", late)?,
                        restated_windows: from_db("restated window count", windows)?,
                        max_lateness_ms: lateness,
                    },
                ))
            })
            .collect()
    }
}
