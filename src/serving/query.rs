//! Answering a view query: batch view ⊕ speed partials of the segments it does not cover,
//! taken under one snapshot, merged and finished by the plan, then filtered by keys and time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use polars::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::format::{rows_json, rows_json_at};
use super::time::{parse_instant, parse_time};
use crate::clock::{Tick, format_ms, format_ns, now_ms};
use crate::plan::Plan;
use crate::spec::{View, Window};
use crate::speed::runtime::PipelineRuntime;

#[derive(Debug, Clone, Default)]
pub struct ViewQuery {
    /// `COL=VALUE` equality filters on group_by columns.
    pub filters: Vec<(String, String)>,
    /// Windows with `from <= window_start < to` (epoch ms).
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// Tag every row with `_origin`: `batch`, `speed` or `both` (which layer's partials it
    /// merges). Costs two extra merges; the dashboard asks for it.
    pub origin: bool,
    /// `as_of`: the answer served at this instant ([`super::travel`]) instead of now's.
    pub as_of: Option<Tick>,
    /// `version=candidate`: the view's candidate version ([`super::candidate`]) instead of
    /// the live one.
    pub candidate: bool,
}

impl ViewQuery {
    /// A query from the URL parameters of `GET /v1/views/…`: `from`/`to` (any form
    /// [`parse_time`] takes, relative to `now_ms`), `format` (json | csv), `origin`, and
    /// `COL=VALUE` filters (checked against the view by [`query`]). Also returns whether the
    /// answer is CSV: `format=csv`, or without `format` an `Accept` starting with `text/csv`.
    /// An `Err` is a message for a 400.
    pub fn from_params(
        params: Vec<(String, String)>,
        now_ms: i64,
        accept: Option<&str>,
    ) -> Result<(ViewQuery, bool), String> {
        let mut q = ViewQuery::default();
        let mut fmt = None;
        for (k, v) in params {
            match k.as_str() {
                "from" => q.from = Some(parse_time(&v, now_ms)?),
                "to" => q.to = Some(parse_time(&v, now_ms)?),
                "format" => fmt = Some(v),
                "origin" => q.origin = matches!(v.as_str(), "" | "1" | "true"),
                "as_of" => q.as_of = Some(parse_instant(&v, now_ms)?),
                "version" => {
                    q.candidate = match v.as_str() {
                        "live" => false,
                        "candidate" => true,
                        other => {
                            return Err(format!("unknown version `{other}` (live or candidate)"));
                        }
                    }
                }
                _ => q.filters.push((k, v)),
            }
        }
        let csv = match fmt.as_deref() {
            Some("csv") => true,
            Some("json") => false,
            Some(other) => return Err(format!("unknown format `{other}` (json or csv)")),
            None => accept.is_some_and(|a| a.starts_with("text/csv")),
        };
        Ok((q, csv))
    }
}

#[derive(Debug, Serialize)]
pub struct Answer {
    #[serde(skip)]
    pub columns: Vec<String>,
    pub rows: Vec<Value>,
    pub as_of: AsOf,
}

/// Where the numbers came from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AsOf {
    /// The instant the answer stands for (RFC 3339, nanoseconds): what was logged and
    /// installed by it. `as_of=` this instant answers the same again.
    pub at: String,
    pub batch_run: Option<String>,
    /// partition → first position not covered by the batch view.
    pub batch_cutoff: BTreeMap<u32, u64>,
    pub batch_published_at: Option<String>,
    /// Partial rows merged from each layer.
    pub batch_rows: u64,
    pub speed_rows: u64,
    /// Segments (open and sealed) the speed layer contributed, and their events.
    pub speed_segments: usize,
    pub speed_events: u64,
    /// Per partition: end (exclusive) of the positions the answer holds — every event below
    /// it is in it (from the batch view or the speed layer), none above.
    pub positions: BTreeMap<u32, u64>,
    /// On a node: partitions other nodes run whose owner has not answered its mirror lately
    /// (it died or the partition is moving): the answer holds them up to `positions`, which
    /// may be behind what was acknowledged. In an `as_of` or candidate answer: those whose
    /// open segment no owner answered (their sealed events only). Left out when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<u32>,
    pub computed_at: String,
    /// The pipeline's latest `verify` (archive and engines checked); `None` if never run.
    pub verified: Option<Verified>,
}

/// The latest `verify` of a pipeline, as an answer reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub ok: bool,
    /// When it finished.
    pub at: String,
    /// Sealed segments it checked.
    pub segments: u64,
    /// When a `verify` last found nothing wrong.
    pub last_success: Option<String>,
}

/// `finished`'s provenance with the pipeline's latest `verify` as it is now (a result newer
/// than the answer's computation is still the one to report).
fn as_of(rt: &PipelineRuntime, finished: &Finished) -> AsOf {
    let mut a = finished.as_of.clone();
    a.verified = verified(rt);
    a.stale = rt.stale_partitions();
    a
}

fn verified(rt: &PipelineRuntime) -> Option<Verified> {
    rt.verified.read().as_ref().map(|v| Verified {
        ok: v.last.ok,
        at: format_ms(v.last.finished_at.timestamp_millis()),
        segments: v.last.segments,
        last_success: v.last_success.map(|t| format_ms(t.timestamp_millis())),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    BadRequest(String),
    /// No such thing to answer from (a view without a candidate version): HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// What was asked for no longer matches the project (a candidate computed by an earlier
    /// edit of the YAML): HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// What an `as_of` answer needs is no longer kept (older than `serve.history`, or across
    /// a change of the view's definition): HTTP 410.
    #[error("{0}")]
    Gone(String),
    #[error("query failed: {0}")]
    Internal(#[from] PolarsError),
    #[error("query failed: {0}")]
    Other(String),
}

/// The user-facing columns of a view, in order.
pub fn columns(view: &View) -> Vec<String> {
    let mut cols = vec!["window_start".to_string(), "window_end".to_string()];
    cols.extend(view.group_by.iter().cloned());
    cols.extend(view.metrics.iter().map(|m| m.name.clone()));
    cols
}

/// A pipeline as serving holds it: the speed runtime it answers from and, beside it, the
/// answers it computed from the runtime's state.
pub struct Served {
    pub runtime: Arc<PipelineRuntime>,
    answers: AnswerCache,
    /// `serve.history`: how far back `as_of` answers go.
    pub history: std::time::Duration,
    /// The project directory: where `version=candidate` reads the edited definitions.
    pub root: Option<std::path::PathBuf>,
    /// `serve.token`: on a node, what it shows other nodes when it reads their logs.
    pub token: Option<String>,
    /// Definitions a server recorded, compiled for `as_of` answers from before a change:
    /// (view, logic hash) → the plan and the view's index in it. Compiled once each.
    pub(super) recorded: Mutex<RecordedPlans>,
}

/// See [`Served::recorded`].
pub(super) type RecordedPlans = HashMap<(String, String), (Arc<Plan>, usize)>;

impl Served {
    pub fn new(runtime: Arc<PipelineRuntime>) -> Served {
        let answers = AnswerCache::new(runtime.pipeline.views.len());
        Served {
            runtime,
            answers,
            history: crate::spec::settings::DEFAULT_HISTORY,
            root: None,
            token: None,
            recorded: Default::default(),
        }
    }

    /// Showing `token` to other nodes.
    pub fn with_token(mut self, token: Option<String>) -> Served {
        self.token = token;
        self
    }

    /// Reading candidate definitions from the project in `root`.
    pub fn with_root(mut self, root: std::path::PathBuf) -> Served {
        self.root = Some(root);
        self
    }

    /// With `serve.history` of `history`.
    pub fn with_history(mut self, history: std::time::Duration) -> Served {
        self.history = history;
        self
    }

    /// Sets `as_of.verified` to the pipeline's latest `verify` as it is now.
    pub fn with_verified(&self, as_of: &mut AsOf) {
        as_of.verified = verified(&self.runtime);
    }

    /// Answers `q` on view `view_idx`.
    pub fn query(&self, view_idx: usize, q: &ViewQuery) -> Result<Answer, QueryError> {
        query(&self.runtime, &self.answers, view_idx, q)
    }

    /// The rows of view `view_idx` that `q` selects, as a frame in the view's output schema,
    /// with where they came from: what the SQL interface runs its statements over, under the
    /// same snapshot and row index as [`Served::query`]. `q.origin` is not used.
    pub fn frame(&self, view_idx: usize, q: &ViewQuery) -> Result<(DataFrame, AsOf), QueryError> {
        frame(&self.runtime, &self.answers, view_idx, q)
    }

    /// The whole answer of view `view_idx` for a reader in the background (a sink): the
    /// cached answer when it is current, else one computed without holding the cache, so a
    /// query never waits for a sink's computation (it would add to ack → visible).
    pub fn answer(&self, view_idx: usize) -> Result<(DataFrame, AsOf), QueryError> {
        let finished = self.answers.get_background(&self.runtime, view_idx)?;
        let df = match &finished.frame {
            Some(df) => df.clone(),
            None => DataFrame::empty_with_schema(&finished.plan.output_schema(view_idx)),
        };
        Ok((df, as_of(&self.runtime, &finished)))
    }
}

fn query(
    rt: &PipelineRuntime,
    answers: &AnswerCache,
    view_idx: usize,
    q: &ViewQuery,
) -> Result<Answer, QueryError> {
    // A bad filter is refused before anything is merged; then against the definition the
    // answer was computed by (a promote may have switched it in between).
    check_filters(&rt.plan().pipeline().views[view_idx], q)?;
    let finished = answers.get(rt, view_idx)?;
    let view = &finished.plan.pipeline().views[view_idx];
    check_filters(view, q)?;
    let cols = columns(view);
    // The all-time window has no start; it spans every range.
    let all_time = view.window == Window::All;
    let mut rows = if q.filters.is_empty() && (q.from.is_none() && q.to.is_none()) {
        finished.all_rows().to_vec()
    } else {
        match &finished.frame {
            // The first filtered query of an answer scans it; the next ones use its index.
            Some(df) if !finished.index.warm() => rows_json(&filter(df.clone(), q, all_time)?),
            Some(df) => rows_json_at(df, finished.index.select(df, q, all_time)?),
            None => Vec::new(),
        }
    };
    if q.origin {
        let (from_batch, from_speed) = finished.origins(view_idx)?;
        for row in &mut rows {
            let k = group_key(view, row);
            let origin = match (from_batch.contains(&k), from_speed.contains(&k)) {
                (true, false) => "batch",
                (false, true) => "speed",
                _ => "both",
            };
            if let Value::Object(obj) = row {
                obj.insert("_origin".into(), Value::String(origin.into()));
            }
        }
    }
    Ok(Answer {
        columns: cols,
        rows,
        as_of: as_of(rt, &finished),
    })
}

/// Whether `q`'s filters are on `view`'s group_by columns (the only ones it filters on).
pub(super) fn check_filters(view: &View, q: &ViewQuery) -> Result<(), QueryError> {
    match q.filters.iter().find(|(c, _)| !view.group_by.contains(c)) {
        None => Ok(()),
        Some((col, _)) => Err(QueryError::BadRequest(format!(
            "cannot filter view `{}` on `{col}`: filters apply to its group_by columns ({})",
            view.name,
            if view.group_by.is_empty() {
                "none".to_string()
            } else {
                view.group_by.join(", ")
            }
        ))),
    }
}

/// A view's merged and finished answer before filtering, and where it came from.
struct Finished {
    /// [`PipelineRuntime::version`] it was computed at.
    version: u64,
    /// The definition it was computed by.
    plan: Arc<Plan>,
    /// `None` when neither layer has partials.
    frame: Option<DataFrame>,
    as_of: AsOf,
    /// Every row as JSON, made by the first unfiltered query.
    rows: OnceLock<Vec<Value>>,
    /// The snapshot's partials of each layer, for [`Finished::origins`].
    batch: Vec<DataFrame>,
    speed: Vec<DataFrame>,
    /// Group keys each layer answers alone, made by the first query asking for `origin`.
    origins: OnceLock<(HashSet<String>, HashSet<String>)>,
    index: RowIndex,
}

/// A row's window and group: what identifies it in either layer's answer.
fn group_key(view: &View, row: &Value) -> String {
    let mut k = row["window_start"].to_string();
    for g in &view.group_by {
        k.push('\u{1}');
        k.push_str(&row[g.as_str()].to_string());
    }
    k
}

/// Merges and finishes partial frames; `None` when there are none.
fn finish_all(
    plan: &Plan,
    view_idx: usize,
    frames: Vec<DataFrame>,
) -> PolarsResult<Option<DataFrame>> {
    if frames.is_empty() {
        return Ok(None);
    }
    let merged = plan.merge(view_idx, frames)?;
    Ok(Some(plan.finish(view_idx, merged)?))
}

impl Finished {
    /// The group keys of the batch layer's answer and of the speed layer's answer (each
    /// finished alone), to tag rows with the layer they come from. Costs two extra merges,
    /// once per version; the dashboard asks for it.
    fn origins(&self, view_idx: usize) -> PolarsResult<&(HashSet<String>, HashSet<String>)> {
        if let Some(o) = self.origins.get() {
            return Ok(o);
        }
        let view = &self.plan.pipeline().views[view_idx];
        let keys = |frames: &[DataFrame]| -> PolarsResult<HashSet<String>> {
            Ok(finish_all(&self.plan, view_idx, frames.to_vec())?
                .map(|df| rows_json(&df).iter().map(|r| group_key(view, r)).collect())
                .unwrap_or_default())
        };
        let computed = (keys(&self.batch)?, keys(&self.speed)?);
        Ok(self.origins.get_or_init(|| computed))
    }

    fn all_rows(&self) -> &[Value] {
        self.rows
            .get_or_init(|| self.frame.as_ref().map(rows_json).unwrap_or_default())
    }
}

/// Row lookup for the filtered queries of one answer, so a point query costs its result rather
/// than a scan. Built lazily, and only from an answer's second filtered query on: an answer
/// replaced after one query (a busy speed layer) never pays for an index.
struct RowIndex {
    group_by: Vec<String>,
    /// Filtered queries so far.
    queries: AtomicU32,
    /// Per group_by column, the rows of each value in the form [`filter`] compares (the column
    /// cast to string); made by the first query filtering on it.
    columns: Vec<OnceLock<HashMap<String, Vec<usize>>>>,
    /// Every row's `window_start` (epoch ms), for time ranges.
    starts: OnceLock<Vec<Option<i64>>>,
}

impl RowIndex {
    fn new(group_by: &[String]) -> RowIndex {
        RowIndex {
            group_by: group_by.to_vec(),
            queries: AtomicU32::new(0),
            columns: group_by.iter().map(|_| OnceLock::new()).collect(),
            starts: OnceLock::new(),
        }
    }

    /// Counts a filtered query; whether it should use the index (all but the first).
    fn warm(&self) -> bool {
        self.queries.fetch_add(1, Ordering::Relaxed) > 0
    }

    /// The rows of `df` (the answer's frame) that [`filter`] keeps, in order: a point query
    /// costs its result, not a scan of the answer.
    fn select(&self, df: &DataFrame, q: &ViewQuery, all_time: bool) -> PolarsResult<Vec<usize>> {
        let mut picked: Option<Vec<usize>> = None;
        for (c, v) in &q.filters {
            let Some(pos) = self.group_by.iter().position(|g| g == c) else {
                polars_bail!(ColumnNotFound: "`{c}` is not a group_by column");
            };
            let rows = match self.columns[pos].get() {
                Some(index) => index,
                None => {
                    let built = column_index(df, c)?;
                    self.columns[pos].get_or_init(|| built)
                }
            }
            .get(v)
            .map_or(&[][..], Vec::as_slice);
            picked = Some(match picked {
                None => rows.to_vec(),
                Some(p) => p
                    .into_iter()
                    .filter(|r| rows.binary_search(r).is_ok())
                    .collect(),
            });
        }
        let mut picked = picked.unwrap_or_else(|| (0..df.height()).collect());
        if !all_time && (q.from.is_some() || q.to.is_some()) {
            let starts = match self.starts.get() {
                Some(s) => s,
                None => {
                    let built: Vec<Option<i64>> = df
                        .column("window_start")?
                        .cast(&DataType::Int64)?
                        .i64()?
                        .iter()
                        .collect();
                    self.starts.get_or_init(|| built)
                }
            };
            picked.retain(|&r| {
                starts[r].is_some_and(|s| {
                    q.from.is_none_or(|from| s >= from) && q.to.is_none_or(|to| s < to)
                })
            });
        }
        Ok(picked)
    }
}

/// Row numbers of `df` by the value of column `c` cast to string (nulls match no filter).
fn column_index(df: &DataFrame, c: &str) -> PolarsResult<HashMap<String, Vec<usize>>> {
    let values = df.column(c)?.cast(&DataType::String)?;
    let mut index: HashMap<String, Vec<usize>> = HashMap::new();
    for (r, v) in values.str()?.iter().enumerate() {
        if let Some(v) = v {
            index.entry(v.to_string()).or_default().push(r);
        }
    }
    Ok(index)
}

/// Per view, the last [`Finished`] answer. Merging and finishing every uncovered partial is
/// the cost of a query; between two changes of the speed state (micro-batches, seals,
/// publishes) every query of a view shares one computation, and concurrent queries after a
/// change wait for the one computing instead of each merging the same partials.
struct AnswerCache {
    /// Per view index; grows when a promote adds views (they run after the others).
    views: RwLock<Vec<Slot>>,
}

/// Where one view's last answer is kept.
type Slot = Arc<Mutex<Option<Arc<Finished>>>>;

impl AnswerCache {
    fn new(views: usize) -> AnswerCache {
        AnswerCache {
            views: RwLock::new((0..views).map(|_| Arc::default()).collect()),
        }
    }

    /// The slot of view `view_idx`'s answer.
    fn slot(&self, view_idx: usize) -> Slot {
        if let Some(slot) = self.views.read().get(view_idx) {
            return slot.clone();
        }
        let mut views = self.views.write();
        while views.len() <= view_idx {
            views.push(Arc::default());
        }
        views[view_idx].clone()
    }

    /// The current answer of view `view_idx`, computed if the state changed since the last.
    fn get(&self, rt: &PipelineRuntime, view_idx: usize) -> PolarsResult<Arc<Finished>> {
        let slot = self.slot(view_idx);
        let mut slot = slot.lock();
        let version = rt.version();
        if let Some(f) = slot.as_ref()
            && f.version == version
        {
            return Ok(f.clone());
        }
        let finished = Arc::new(compute(rt, view_idx)?);
        *slot = Some(finished.clone());
        Ok(finished)
    }

    /// Like [`AnswerCache::get`], but computing a missing answer outside the slot's lock; the
    /// result is kept for queries unless a newer one arrived meanwhile.
    fn get_background(&self, rt: &PipelineRuntime, view_idx: usize) -> PolarsResult<Arc<Finished>> {
        let slot = self.slot(view_idx);
        {
            let slot = slot.lock();
            if let Some(f) = slot.as_ref()
                && f.version == rt.version()
            {
                return Ok(f.clone());
            }
        }
        let finished = Arc::new(compute(rt, view_idx)?);
        let mut slot = slot.lock();
        if slot.as_ref().is_none_or(|f| f.version < finished.version) {
            *slot = Some(finished.clone());
        }
        Ok(finished)
    }
}

fn compute(rt: &PipelineRuntime, view_idx: usize) -> PolarsResult<Finished> {
    let snap = rt.snapshot(view_idx);
    let batch_rows = snap
        .batch
        .as_ref()
        .map_or(0, |b| b.partials.height() as u64);
    let speed_rows: u64 = snap.speed.iter().map(|f| f.height() as u64).sum();
    let batch: Vec<DataFrame> = snap.batch.iter().map(|b| b.partials.clone()).collect();
    let mut frames = snap.speed.clone();
    frames.extend(batch.iter().cloned());
    let horizon = snap.batch.as_ref().and_then(|b| b.horizon_ms);
    let frame = finish(&snap.plan, view_idx, frames, horizon)?;
    let as_of = AsOf {
        at: format_ns(snap.tick.ns()),
        batch_run: snap.batch.as_ref().map(|b| b.run_id.clone()),
        batch_cutoff: snap
            .batch
            .as_ref()
            .map(|b| b.cutoff.clone())
            .unwrap_or_default(),
        batch_published_at: snap.batch.as_ref().map(|b| format_ms(b.published_at_ms)),
        batch_rows,
        speed_rows,
        speed_segments: snap.speed_segments,
        speed_events: snap.speed_events,
        positions: snap.positions.clone(),
        stale: Vec::new(),
        computed_at: format_ms(now_ms()),
        verified: None,
    };
    Ok(Finished {
        version: snap.version,
        index: RowIndex::new(&snap.plan.pipeline().views[view_idx].group_by),
        plan: snap.plan,
        frame,
        as_of,
        rows: OnceLock::new(),
        batch,
        speed: snap.speed,
        origins: OnceLock::new(),
    })
}

/// Partial frames merged and finished, without the windows retired at `horizon`; `None` when
/// there are none.
pub(super) fn finish(
    plan: &crate::plan::Plan,
    view_idx: usize,
    frames: Vec<DataFrame>,
    horizon: Option<i64>,
) -> PolarsResult<Option<DataFrame>> {
    if frames.is_empty() {
        return Ok(None);
    }
    let merged = plan.merge(view_idx, frames)?;
    let df = plan.finish(view_idx, merged)?;
    Ok(Some(match horizon {
        Some(h) => without_retired(df, h)?,
        None => df,
    }))
}

/// A finished answer without the windows `retention` retired: those that ended at or before
/// `horizon_ms`, whichever layer's partials they come from (late events the speed layer took
/// after the retention included). All-time rows have no end and stay.
fn without_retired(df: DataFrame, horizon_ms: i64) -> PolarsResult<DataFrame> {
    let end = col("window_end").cast(DataType::Int64);
    df.lazy()
        .filter(end.clone().gt(lit(horizon_ms)).or(end.is_null()))
        .collect()
}

fn frame(
    rt: &PipelineRuntime,
    answers: &AnswerCache,
    view_idx: usize,
    q: &ViewQuery,
) -> Result<(DataFrame, AsOf), QueryError> {
    check_filters(&rt.plan().pipeline().views[view_idx], q)?;
    let finished = answers.get(rt, view_idx)?;
    let view = &finished.plan.pipeline().views[view_idx];
    check_filters(view, q)?;
    let all_time = view.window == Window::All;
    let df = match &finished.frame {
        None => DataFrame::empty_with_schema(&finished.plan.output_schema(view_idx)),
        Some(df) if q.filters.is_empty() && q.from.is_none() && q.to.is_none() => df.clone(),
        Some(df) if !finished.index.warm() => filter(df.clone(), q, all_time)?,
        Some(df) => {
            let rows = finished.index.select(df, q, all_time)?;
            let rows: Vec<IdxSize> = rows.into_iter().map(|r| r as IdxSize).collect();
            df.take(&IdxCa::from_vec("rows".into(), rows))?
        }
    };
    Ok((df, as_of(rt, &finished)))
}

/// The rows of `df` (a finished answer) that `q` asks for, by a scan.
pub(super) fn filter(df: DataFrame, q: &ViewQuery, all_time: bool) -> PolarsResult<DataFrame> {
    let mut pred: Option<Expr> = None;
    let mut and = |e: Expr| {
        pred = Some(match pred.take() {
            Some(p) => p.and(e),
            None => e,
        })
    };
    for (c, v) in &q.filters {
        and(col(c.as_str()).cast(DataType::String).eq(lit(v.clone())));
    }
    if !all_time {
        let start = col("window_start").cast(DataType::Int64);
        if let Some(from) = q.from {
            and(start.clone().gt_eq(lit(from)));
        }
        if let Some(to) = q.to {
            and(start.lt(lit(to)));
        }
    }
    match pred {
        Some(p) => df.lazy().filter(p).collect(),
        None => Ok(df),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A finished answer: windows (some null), a string and an integer key (some null).
    fn answer(rows: &[(Option<i64>, Option<u8>, Option<i64>)]) -> DataFrame {
        let starts: Vec<Option<i64>> = rows.iter().map(|r| r.0.map(|m| m * 60_000)).collect();
        let pages: Vec<Option<String>> = rows
            .iter()
            .map(|r| r.1.map(|p| format!("/p/{p}")))
            .collect();
        let codes: Vec<Option<i64>> = rows.iter().map(|r| r.2).collect();
        let n: Vec<u64> = (0..rows.len() as u64).collect();
        let start = Series::new("window_start".into(), starts)
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))
            .unwrap();
        DataFrame::new(
            rows.len(),
            vec![
                start.into(),
                Column::new("page".into(), pages),
                Column::new("code".into(), codes),
                Column::new("n".into(), n),
            ],
        )
        .unwrap()
    }

    fn row() -> impl Strategy<Value = (Option<i64>, Option<u8>, Option<i64>)> {
        (
            proptest::option::weighted(0.9, 0..6i64),
            proptest::option::weighted(0.9, 0..4u8),
            proptest::option::weighted(0.9, -1..3i64),
        )
    }

    fn query() -> impl Strategy<Value = ViewQuery> {
        (
            proptest::option::of(0..5u8),
            proptest::option::of(-2..4i64),
            proptest::option::of(-1..7i64),
            proptest::option::of(-1..7i64),
        )
            .prop_map(|(page, code, from, to)| ViewQuery {
                filters: page
                    .map(|p| ("page".to_string(), format!("/p/{p}")))
                    .into_iter()
                    .chain(code.map(|c| ("code".to_string(), c.to_string())))
                    .collect(),
                from: from.map(|m| m * 60_000),
                to: to.map(|m| m * 60_000),
                ..ViewQuery::default()
            })
    }

    proptest! {
        /// The index answers every query exactly as the scan does, rows in the same order.
        #[test]
        fn the_row_index_selects_what_the_filter_keeps(
            rows in proptest::collection::vec(row(), 0..60),
            queries in proptest::collection::vec((query(), any::<bool>()), 1..12),
        ) {
            let df = answer(&rows);
            let index = RowIndex::new(&["page".to_string(), "code".to_string()]);
            for (q, all_time) in &queries {
                let scanned = rows_json(&filter(df.clone(), q, *all_time).unwrap());
                let looked_up = rows_json_at(&df, index.select(&df, q, *all_time).unwrap());
                prop_assert_eq!(looked_up, scanned, "{:?}", q);
            }
        }
    }

    #[test]
    fn only_the_second_filtered_query_on_builds_the_index() {
        let index = RowIndex::new(&["page".to_string()]);
        assert!(!index.warm());
        assert!(index.warm());
        assert!(index.columns[0].get().is_none());
        let df = answer(&[(Some(1), Some(2), None), (Some(2), Some(2), Some(1))]);
        let q = ViewQuery {
            filters: vec![("page".into(), "/p/2".into())],
            ..ViewQuery::default()
        };
        assert_eq!(index.select(&df, &q, false).unwrap(), vec![0, 1]);
        assert!(index.columns[0].get().is_some());
    }
}
