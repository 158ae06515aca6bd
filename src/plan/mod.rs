//! The plan (DESIGN.md §2): the ONE definition of decode → filter → derived columns →
//! windows → mergeable partial aggregates, compiled once per pipeline and run by the speed
//! layer on micro-batches and by the batch layer on archived Parquet.
//!
//! ```text
//!  bytes ──decode──► events ──prepare──► prepared ──partials(view)──► partials ─┐
//!  (NDJSON/CSV)   (schema types)  (filter, columns)    (polars group-by)         │
//!                                                                                ▼
//!            finished rows ◄──finish── partials ◄──merge── partials ⊕ partials ⊕ …
//! ```
//!
//! Decoding is hand-written ([`decode`]); filter, derived columns, window assignment and the
//! partial aggregation are one lazy polars query per view ([`aggregate`]); merging and
//! finishing happen in one place, the [`Accumulator`], which is also the in-memory form the
//! speed layer keeps per segment.
//!
//! # Semantics
//!
//! - Windows are aligned to the Unix epoch in UTC. Tumbling: `start = ⌊t / size⌋ · size`.
//!   Hopping: an event is in the `size / every` windows with `start <= t < start + size`.
//!   Session: per group key, events closer than `gap` share a session; `window_start` is its
//!   first event time and `window_end` its last event time + `gap`. Two partial sessions whose
//!   `[start, last + gap)` intervals overlap merge into one, which is what makes sessions split
//!   across micro-batches or segments come out as if computed at once. All: one window,
//!   `window_start` and `window_end` null.
//! - Nulls are ignored by every aggregate but `count()`, as in SQL: with no non-null input,
//!   `count(col)` and `approx_count_distinct` are 0, the others null; `variance`/`stddev`
//!   (sample, n − 1) need two values. `first`/`last` take the non-null value at the
//!   earliest/latest event time; on a tie the smallest/largest value wins, so the answer never
//!   depends on arrival order. NaN produced by a derived column counts as null.
//! - Event times must lie in years 0000–9999 (what RFC 3339 can write); others are rejected
//!   at decode like any bad value.
//! - `approx_count_distinct`: HyperLogLog, 2^12 registers (≈ 1.6 % standard error), xxh64 of
//!   the value's canonical bytes ([`hll`]). `approx_quantile`: log-bucket histogram with 1 %
//!   relative accuracy at rank ⌊q·(n−1)⌋ ([`quantile`]).
//! - Output rows are sorted by `window_start`, then the group keys (nulls last); columns are
//!   `window_start`, `window_end` (timestamps), the group_by columns, then the metrics:
//!   counts and distinct counts `Int64`; sum/min/max/first/last in the input's type; avg,
//!   variance, stddev and quantiles `Float64`.
//!
//! # Partials format, version 1 ([`PARTIALS_FORMAT_VERSION`])
//!
//! One row per group. Columns, in this order:
//!
//! | column | type | present for |
//! |---|---|---|
//! | `window_start` | timestamp (ms, UTC) | tumbling: window start; session: first event |
//! | `pane_start` | timestamp | hopping: start of the `every`-aligned pane (not the window) |
//! | `session_last` | timestamp | session: last event time |
//! | group_by columns | their types | every view |
//! | `__rows` | UInt64 | events in the group |
//! | `{metric}__n` | UInt64 | count(col), sum, avg, variance, stddev: non-null inputs |
//! | `{metric}__sum` | Int64 / Float64 | sum, avg (0 when `__n` is 0; Int64 wraps like polars) |
//! | `{metric}__min`, `{metric}__max` | input type | min, max (null when none) |
//! | `{metric}__mean`, `{metric}__m2` | Float64 | variance, stddev: mean and Σ(x − mean)² |
//! | `{metric}__t`, `{metric}__v` | timestamp, input type | first, last: time and value |
//! | `{metric}__hll` | List(UInt32) | approx_count_distinct: `register << 8 \| rank`, one per register |
//! | `{metric}__dd_bucket`, `{metric}__dd_count` | List(Int32), List(UInt64) | approx_quantile: bucket codes and counts |
//!
//! `count()` has no state of its own (it is `__rows`). HLL entries are sorted by register,
//! quantile buckets by code. [`Plan::partials`] gives one row per group (per session found in
//! its input) in no particular order; [`Plan::merge`] and [`Accumulator::to_partials`] give
//! one row per group sorted by window, then keys. A Parquet file written by
//! [`Plan::write_partials`] carries the format version, the view and its logic hash in its
//! key-value metadata ([`FORMAT_KEY`], [`VIEW_KEY`], [`LOGIC_HASH_KEY`]).
//! A change to any of this is a new format version, and the version is part of every logic
//! hash, so a new version recomputes every view.

mod accumulator;
mod aggregate;
pub(crate) mod decode;
mod hll;
mod keyindex;
mod late;
mod layout;
pub mod lookup;
mod parquet;
mod quantile;
mod value;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use polars::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

use crate::spec::expr;
use crate::spec::{ColumnType, OnMissing, Pipeline};

pub use accumulator::Accumulator;
pub(crate) use decode::csv_whole_records;
pub use decode::{Decoded, Rejection};
pub use late::{Restated, Restating, json};
pub use lookup::{LookupSet, LookupTable, TableError};
pub use parquet::{FORMAT_KEY, LOGIC_HASH_KEY, VIEW_KEY};

use layout::ViewLayout;

/// Version of the partials representation described in the module docs.
pub const PARTIALS_FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The filter or a derived column does not compile (validation normally catches this).
    #[error("pipeline `{pipeline}`: {what} `{sql}`: {reason}")]
    Expr {
        pipeline: String,
        what: String,
        sql: String,
        reason: String,
    },
    /// A view names a column or combination the plan cannot aggregate.
    #[error("pipeline `{pipeline}`, view `{view}`: {reason}")]
    View {
        pipeline: String,
        view: String,
        reason: String,
    },
    /// A partials file of another format version (or none): recompute it.
    #[error("partials of view `{view}` are format {found:?}, this build reads format {expected}")]
    PartialsFormat {
        view: String,
        found: Option<String>,
        expected: u32,
    },
    /// A partials file computed by other logic (the spec changed since): recompute it.
    #[error(
        "partials of view `{view}` were computed with logic {found:?}, the view's logic is now {expected}"
    )]
    PartialsLogic {
        view: String,
        found: Option<String>,
        expected: String,
    },
    #[error(transparent)]
    Polars(#[from] PolarsError),
}

/// One micro-batch through the plan ([`Plan::partials_masked`]).
#[derive(Debug)]
pub struct Masked {
    /// Partials of every view, in view order.
    pub parts: Vec<DataFrame>,
    /// Per event, the filter's result (None without a filter); a null drops the event.
    pub filter: Option<BooleanChunked>,
    /// Per lookup with `on_missing: reject`: its name and, per event, whether it has no row
    /// for the event (the event is dropped).
    pub rejected: Vec<(String, BooleanChunked)>,
}

/// A pipeline compiled once: everything needed to turn its bytes into finished view rows.
#[derive(Debug)]
pub struct Plan {
    pipeline: Pipeline,
    decoder: decode::Decoder,
    /// `decoder` without the `event_id` requirement, for replaying the write-ahead log.
    log_decoder: decode::Decoder,
    filter: Option<Expr>,
    /// Derived columns, cast to their spec type, in declaration order.
    columns: Vec<Expr>,
    /// The lookups that filter or derived columns read, or that reject events without a row.
    joins: Vec<lookup::Join>,
    views: Vec<Arc<ViewLayout>>,
    hashes: Vec<String>,
}

impl Plan {
    pub fn compile(pipeline: &Pipeline) -> Result<Plan, PlanError> {
        let expr_err = |what: String, sql: &str, reason: String| PlanError::Expr {
            pipeline: pipeline.name.clone(),
            what,
            sql: sql.to_string(),
            reason,
        };
        if pipeline.column_type(&pipeline.event_time) != Some(ColumnType::Timestamp) {
            return Err(PlanError::Expr {
                pipeline: pipeline.name.clone(),
                what: "event_time".into(),
                sql: pipeline.event_time.clone(),
                reason: "is not a timestamp column of the schema".into(),
            });
        }
        let mut available = pipeline.schema.clone();
        // Every lookup's columns, `NAME.COLUMN`: what the filter and derived columns may read.
        let joined: Vec<(String, ColumnType)> = pipeline
            .lookups
            .iter()
            .flat_map(|l| l.schema.iter().map(|(c, t)| (l.column_name(c), *t)))
            .collect();
        let mut read = std::collections::BTreeSet::new();
        let visible = |available: &[(String, ColumnType)]| -> Vec<(String, ColumnType)> {
            available.iter().chain(&joined).cloned().collect()
        };
        let filter = match &pipeline.filter {
            None => None,
            Some(sql) => {
                match expr::check(sql, &visible(&available)) {
                    Ok(ColumnType::Bool) => {}
                    Ok(t) => {
                        return Err(expr_err(
                            "filter".into(),
                            sql,
                            format!("must be boolean, it is a {}", t.name()),
                        ));
                    }
                    Err(e) => return Err(expr_err("filter".into(), sql, e)),
                }
                let e = expr::parse(sql).map_err(|e| expr_err("filter".into(), sql, e))?;
                read.extend(e.clone().meta().root_names());
                Some(e)
            }
        };
        let mut columns = Vec::new();
        for (name, sql) in &pipeline.columns {
            let what = format!("column `{name}`");
            let t = expr::check(sql, &visible(&available))
                .map_err(|e| expr_err(what.clone(), sql, e))?;
            let parsed = expr::parse(sql).map_err(|e| expr_err(what, sql, e))?;
            read.extend(parsed.clone().meta().root_names());
            let mut e = parsed.cast(expr::dtype(t));
            if t == ColumnType::Float {
                // NaN has no place in SQL aggregates; treating it as null keeps min/max/sum
                // well defined and equal in every layer.
                e = e.fill_nan(lit(NULL).cast(DataType::Float64));
            }
            columns.push(e.alias(name.as_str()));
            available.push((name.clone(), t));
        }
        let joins = pipeline
            .lookups
            .iter()
            .enumerate()
            .map(|(i, l)| lookup::Join {
                lookup: i,
                on: l.on.clone(),
                event_time: l.valid.as_ref().map(|_| pipeline.event_time.clone()),
                columns: l
                    .schema
                    .iter()
                    .filter(|(c, _)| read.iter().any(|r| r.as_str() == l.column_name(c)))
                    .map(|(c, t)| (c.clone(), l.column_name(c), expr::dtype(*t)))
                    .collect(),
                reject: l.on_missing == OnMissing::Reject,
                row_column: format!("__lookup_row.{}", l.name),
            })
            .filter(|j| j.reject || !j.columns.is_empty())
            .collect();
        let views = pipeline
            .views
            .iter()
            .map(|v| ViewLayout::build(pipeline, v, &available).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let hashes = views.iter().map(|v| logic_hash(pipeline, v)).collect();
        let decoder = decode::Decoder::new(pipeline);
        Ok(Plan {
            pipeline: pipeline.clone(),
            log_decoder: decoder.without_event_id(),
            decoder,
            filter,
            columns,
            joins,
            views,
            hashes,
        })
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// NDJSON or CSV (per the pipeline's format) → events with exactly the schema columns,
    /// in order, plus one rejection per bad line. Never fails and never panics.
    pub fn decode(&self, bytes: &[u8]) -> Decoded {
        self.decoder.decode(bytes)
    }

    /// [`Plan::decode`] for records of the write-ahead log: they were accepted, so an event
    /// without a usable `event_id` logged before ids were required still decodes.
    pub fn decode_logged(&self, bytes: &[u8]) -> Decoded {
        self.log_decoder.decode(bytes)
    }

    /// Per event, whether the pipeline's `filter` keeps it (a null result drops it, as in
    /// [`Plan::prepare`]); `None` without a filter. `events` carry the lookups' columns when
    /// the filter reads them ([`Plan::join`]).
    pub fn filter_mask(&self, events: &DataFrame) -> PolarsResult<Option<BooleanChunked>> {
        const KEEP: &str = "__lambda_filter_keeps";
        let Some(f) = &self.filter else {
            return Ok(None);
        };
        // `with_column` broadcasts a filter that is a constant (`1 = 1`) to every row.
        let keep = micro_batch(
            events
                .clone()
                .lazy()
                .with_column(f.clone().alias(KEEP))
                .select([col(KEEP)]),
        )
        .collect()?;
        Ok(Some(keep.column(KEEP)?.bool()?.clone()))
    }

    /// Whether the pipeline has lookups the plan joins (read by the filter or a derived
    /// column, or rejecting events without a row).
    pub fn joins_lookups(&self) -> bool {
        !self.joins.is_empty()
    }

    /// The lookups joined to the events with the versions in `lookups` (one table per lookup
    /// of the pipeline, in order): the columns that filter and derived columns read, as
    /// `NAME.COLUMN`; events a lookup with `on_missing: reject` has no row for are dropped.
    pub fn join(&self, events: LazyFrame, lookups: &LookupSet) -> PolarsResult<LazyFrame> {
        if self.joins.is_empty() {
            return Ok(events);
        }
        let lf = self.enrich(events, lookups)?;
        let mut lf = lf;
        for j in self.joins.iter().filter(|j| j.reject) {
            lf = lf.filter(col(j.row_column.as_str()).is_not_null());
        }
        Ok(self.drop_rows(lf))
    }

    /// The joins' row numbers and columns, nothing dropped.
    fn enrich(&self, mut lf: LazyFrame, lookups: &LookupSet) -> PolarsResult<LazyFrame> {
        let tables = lookups.tables();
        let names: Vec<&str> = tables.iter().map(|t| t.name()).collect();
        let expected: Vec<&str> = self
            .pipeline
            .lookups
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        if names != expected {
            return Err(PolarsError::ComputeError(
                format!(
                    "pipeline `{}` joins lookups {expected:?}, but versions of {names:?} were given",
                    self.pipeline.name
                )
                .into(),
            ));
        }
        for j in &self.joins {
            let (rows, taken) = j.exprs(&tables[j.lookup]);
            lf = lf.with_column(rows);
            if !taken.is_empty() {
                lf = lf.with_columns(taken);
            }
        }
        Ok(lf)
    }

    fn drop_rows(&self, lf: LazyFrame) -> LazyFrame {
        let rows: Vec<&str> = self.joins.iter().map(|j| j.row_column.as_str()).collect();
        lf.drop(by_name(rows, true, false))
    }

    /// Lookups, filter, then derived columns, lazily: the batch layer passes a `scan_parquet`
    /// frame of segments that share one set of lookup versions.
    pub fn prepare(&self, events: LazyFrame, lookups: &LookupSet) -> PolarsResult<LazyFrame> {
        let events = self.join(events, lookups)?;
        Ok(match &self.filter {
            Some(f) => self.derive(events.filter(f.clone())),
            None => self.derive(events),
        })
    }

    /// The derived columns, in order.
    fn derive(&self, mut lf: LazyFrame) -> LazyFrame {
        // One `with_column` each: a derived column may use the ones declared before it.
        for c in &self.columns {
            lf = lf.with_column(c.clone());
        }
        lf
    }

    /// One micro-batch's partials for every view, in view order, with what dropped events
    /// from them — the same rows [`Plan::prepare`] keeps (a null filter result drops the
    /// event): the speed layer counts what the filter dropped, and dead-letters what a lookup
    /// rejected, from the masks that dropped them, so each runs once.
    pub fn partials_masked(&self, events: DataFrame, lookups: &LookupSet) -> PolarsResult<Masked> {
        let enriched = if self.joins.is_empty() {
            events
        } else {
            self.enrich(events.lazy(), lookups)?.collect()?
        };
        let mut rejected = Vec::new();
        for j in self.joins.iter().filter(|j| j.reject) {
            let missing = enriched.column(&j.row_column)?.is_null();
            rejected.push((self.pipeline.lookups[j.lookup].name.clone(), missing));
        }
        let filter = self.filter_mask(&enriched)?;
        let mut keep = filter
            .as_ref()
            .map(|m| m.fill_null_with_values(false))
            .transpose()?;
        for (_, missing) in &rejected {
            let ok = !missing;
            keep = Some(match keep {
                Some(k) => &k & &ok,
                None => ok,
            });
        }
        let kept = match &keep {
            Some(k) => enriched.filter(k)?,
            None => enriched,
        };
        let kept = if self.joins.is_empty() {
            kept
        } else {
            self.drop_rows(kept.lazy()).collect()?
        };
        let prepared = micro_batch(self.derive(kept.lazy())).collect()?.lazy();
        let parts = self.partials_of(&self.all_views(), prepared, Engine::InMemory)?;
        Ok(Masked {
            parts,
            filter,
            rejected,
        })
    }

    /// Partial aggregation of prepared events for view `view` (an index into
    /// `pipeline().views`), in partials format v1. Panics if `view` is out of range.
    pub fn partials(&self, view: usize, prepared: LazyFrame) -> LazyFrame {
        aggregate::partials(&self.views[view], prepared)
    }

    /// Prepares one micro-batch once and computes every view's partials from it, in view order.
    pub fn partials_all(
        &self,
        events: DataFrame,
        lookups: &LookupSet,
    ) -> PolarsResult<Vec<DataFrame>> {
        let prepared = micro_batch(self.prepare(events.lazy(), lookups)?)
            .collect()?
            .lazy();
        self.partials_of(&self.all_views(), prepared, Engine::InMemory)
    }

    /// The partials of the views `views` (indices, in their order) over `prepared` events, as
    /// one query on `engine`: the views' plans are optimized and run together (one read of a
    /// scan, one fixed cost per micro-batch), not one query each.
    pub fn partials_of(
        &self,
        views: &[usize],
        prepared: LazyFrame,
        engine: Engine,
    ) -> PolarsResult<Vec<DataFrame>> {
        let queries: Vec<LazyFrame> = views
            .iter()
            .map(|&v| match engine {
                Engine::InMemory => micro_batch(self.partials(v, prepared.clone())),
                _ => self.partials(v, prepared.clone()),
            })
            .collect();
        match queries.as_slice() {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![
                one.clone().collect_with_engine(engine)?.unwrap_single(),
            ]),
            [first, ..] => {
                let flags = first.get_current_optimizations();
                let plans = queries.into_iter().map(|q| q.logical_plan).collect();
                LazyFrame::collect_all_with_engine(plans, engine, flags)
            }
        }
    }

    /// Every view's index, in order.
    fn all_views(&self) -> Vec<usize> {
        (0..self.views.len()).collect()
    }

    /// An empty in-memory accumulator for view `view`.
    pub fn accumulator(&self, view: usize) -> Accumulator {
        Accumulator::new(Arc::clone(&self.views[view]))
    }

    /// Merges partial frames of view `view` into one canonical frame (one row per group).
    /// Associative and commutative: any grouping and order of the same parts gives the same
    /// answer (floating-point states up to rounding).
    pub fn merge(&self, view: usize, parts: Vec<DataFrame>) -> PolarsResult<DataFrame> {
        let mut acc = self.accumulator(view);
        for p in &parts {
            acc.absorb(p)?;
        }
        acc.to_partials()
    }

    /// [`Plan::merge`] for what ONE [`Plan::partials`] query computed over all of its events
    /// at once (the batch layer's scan): one row per group already, so the part is only
    /// sorted as the merge sorts (window, then keys, nulls last), not taken apart and rebuilt
    /// group by group. Several parts, and sessions (whose rows a merge may join), are merged.
    pub fn merge_scanned(&self, view: usize, mut parts: Vec<DataFrame>) -> PolarsResult<DataFrame> {
        let layout = &self.views[view];
        if parts.len() != 1 || matches!(layout.window, layout::WindowLayout::Session { .. }) {
            return self.merge(view, parts);
        }
        let part = parts.remove(0);
        if part.schema().as_ref() != &layout.partial_schema() {
            // Not what `partials` writes: the merge checks it and says what is wrong.
            return self.merge(view, vec![part]);
        }
        let by: Vec<&str> = layout
            .window_columns()
            .iter()
            .copied()
            .chain(layout.keys.iter().map(|(k, _)| k.as_str()))
            .collect();
        if by.is_empty() {
            return Ok(part);
        }
        part.sort(by, SortMultipleOptions::default().with_nulls_last(true))
    }

    /// Partials (merged or not) → user-facing rows: `window_start`, `window_end`, group_by
    /// columns, metrics in declared order; sorted by `window_start`, then keys.
    pub fn finish(&self, view: usize, partials: DataFrame) -> PolarsResult<DataFrame> {
        let mut acc = self.accumulator(view);
        acc.absorb(&partials)?;
        acc.finish()
    }

    /// Drops the partial rows of view `view` that only feed windows ending at or before
    /// `horizon_ms` (every event of such a window is older than the horizon): tumbling windows
    /// by `window_start + size`, hopping panes by `pane_start + size` (the end of the last
    /// window a pane is in), sessions by `session_last + gap`. An all-time view keeps its row.
    /// Windows that end after the horizon keep every partial, so they stay exact. A hopping
    /// window that ended by the horizon can still be finished from a newer pane it shares:
    /// whoever serves trimmed partials leaves out rows whose `window_end` is at or before it.
    pub fn trim_partials(
        &self,
        view: usize,
        partials: DataFrame,
        horizon_ms: i64,
    ) -> PolarsResult<DataFrame> {
        use layout::{PANE_START, SESSION_LAST, WINDOW_START, WindowLayout};
        let (column, span) = match self.views[view].window {
            WindowLayout::Tumbling { size } => (WINDOW_START, size),
            WindowLayout::Hopping { size, .. } => (PANE_START, size),
            WindowLayout::Session { gap } => (SESSION_LAST, gap),
            WindowLayout::All => return Ok(partials),
        };
        // Window columns are never null in windowed partials; a null row is kept, not lost.
        let end = col(column).cast(DataType::Int64) + lit(span);
        partials
            .lazy()
            .filter(end.clone().gt(lit(horizon_ms)).or(end.is_null()))
            .collect()
    }

    /// Changes whenever anything that decides the view's answer changes — schema, lookup
    /// definitions (key, on, schema, on_missing, effective dating), filter, derived columns,
    /// window, group_by, metrics, partials format — and not for descriptions, sources,
    /// archive or dedupe settings, nor for where a lookup's rows come from or a refresh of
    /// them (the versions a segment was computed with are recorded with it).
    pub fn logic_hash(&self, view: usize) -> String {
        self.hashes[view].clone()
    }

    /// Expected partial schema of view `view`.
    pub fn partials_schema(&self, view: usize) -> Schema {
        self.views[view].partial_schema()
    }

    /// Schema of `finish`'s rows for view `view`.
    pub fn output_schema(&self, view: usize) -> Schema {
        self.views[view].output_schema()
    }
}

/// Optimizer passes a micro-batch's in-memory queries skip: run once per batch over a frame
/// already in memory, common-subplan/subexpression elimination, pushdowns and the other
/// rewrites cost more to plan than they save (plan bench, 1k-event batches: partials 940-990 ->
/// 820-850 ns/event). Type coercion and checks and projection pushdown stay; the answer is the
/// same, as every pass only rewrites the plan into an equivalent one.
const MICRO_BATCH_SKIPS: OptFlags = OptFlags::COMM_SUBPLAN_ELIM
    .union(OptFlags::COMM_SUBEXPR_ELIM)
    .union(OptFlags::PREDICATE_PUSHDOWN)
    .union(OptFlags::SLICE_PUSHDOWN)
    .union(OptFlags::SIMPLIFY_EXPR)
    .union(OptFlags::CLUSTER_WITH_COLUMNS)
    .union(OptFlags::CHECK_ORDER_OBSERVE)
    .union(OptFlags::SORT_COLLAPSE);

/// `lf` planned as a micro-batch's query: without [`MICRO_BATCH_SKIPS`].
fn micro_batch(lf: LazyFrame) -> LazyFrame {
    let flags = lf.get_current_optimizations() & !MICRO_BATCH_SKIPS;
    lf.with_optimizations(flags)
}

fn logic_hash(p: &Pipeline, view: &ViewLayout) -> String {
    let mut text = format!(
        "lambda-ctl partials format {PARTIALS_FORMAT_VERSION}\nhll p={} xxh64; quantile alpha={}\n",
        hll::P,
        quantile::ALPHA
    );
    for (name, t) in &p.schema {
        text.push_str(&format!("schema: {name} {}\n", t.name()));
        // Only nested columns add a line: flat schemas keep their earlier hash.
        if let Some(path) = p.paths.get(name) {
            text.push_str(&format!("path: {name} {path}\n"));
        }
    }
    // A lookup's definition decides the answer; where its rows come from (`from`, `refresh`)
    // does not: the rows are a version, recorded per segment like the events themselves.
    // Pipelines without lookups keep their earlier hash.
    for l in &p.lookups {
        text.push_str(&format!(
            "lookup: {} key={} on={} on_missing={:?} valid={:?}\n",
            l.name, l.key, l.on, l.on_missing, l.valid
        ));
        for (name, t) in &l.schema {
            text.push_str(&format!("lookup column: {}.{name} {}\n", l.name, t.name()));
        }
    }
    if let Some(f) = &p.filter {
        text.push_str(&format!("filter: {}\n", f.trim()));
    }
    for (name, sql) in &p.columns {
        text.push_str(&format!("column: {name} = {}\n", sql.trim()));
    }
    text.push_str(&view.describe());
    format!("{:032x}", xxh3_128(text.as_bytes()))
}
