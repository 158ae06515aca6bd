//! Answering a view query: batch view ⊕ speed partials of the segments it does not cover,
//! taken under one snapshot, merged and finished by the plan, then filtered by keys and time.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use polars::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::format::rows_json;
use super::time::format_ms;
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
}

#[derive(Debug, Serialize)]
pub struct Answer {
    #[serde(skip)]
    pub columns: Vec<String>,
    pub rows: Vec<Value>,
    pub as_of: AsOf,
}

/// Where the numbers came from.
#[derive(Debug, Clone, Serialize)]
pub struct AsOf {
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
    pub computed_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    BadRequest(String),
    #[error("query failed: {0}")]
    Internal(#[from] PolarsError),
}

/// The user-facing columns of a view, in order.
pub fn columns(view: &View) -> Vec<String> {
    let mut cols = vec!["window_start".to_string(), "window_end".to_string()];
    cols.extend(view.group_by.iter().cloned());
    cols.extend(view.metrics.iter().map(|m| m.name.clone()));
    cols
}

pub fn query(rt: &PipelineRuntime, view_idx: usize, q: &ViewQuery) -> Result<Answer, QueryError> {
    let view = &rt.pipeline.views[view_idx];
    for (col, _) in &q.filters {
        if !view.group_by.contains(col) {
            return Err(QueryError::BadRequest(format!(
                "cannot filter view `{}` on `{col}`: filters apply to its group_by columns ({})",
                view.name,
                if view.group_by.is_empty() {
                    "none".to_string()
                } else {
                    view.group_by.join(", ")
                }
            )));
        }
    }
    let finished = rt.answers.get(rt, view_idx)?;
    let cols = columns(view);
    let mut rows = if q.filters.is_empty() && (q.from.is_none() && q.to.is_none()) {
        finished.all_rows().to_vec()
    } else {
        match &finished.frame {
            Some(df) => rows_json(&filter(df.clone(), view, q)?),
            None => Vec::new(),
        }
    };
    if q.origin {
        let (from_batch, from_speed) = finished.origins(rt, view_idx)?;
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
        as_of: finished.as_of.clone(),
    })
}

/// A view's merged and finished answer before filtering, and where it came from.
pub struct Finished {
    /// [`crate::speed::partials::SpeedState::version`] it was computed at.
    version: u64,
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
    rt: &PipelineRuntime,
    view_idx: usize,
    frames: Vec<DataFrame>,
) -> PolarsResult<Option<DataFrame>> {
    if frames.is_empty() {
        return Ok(None);
    }
    let merged = rt.plan.merge(view_idx, frames)?;
    Ok(Some(rt.plan.finish(view_idx, merged)?))
}

impl Finished {
    /// The group keys of the batch layer's answer and of the speed layer's answer (each
    /// finished alone), to tag rows with the layer they come from. Costs two extra merges,
    /// once per version; the dashboard asks for it.
    fn origins(
        &self,
        rt: &PipelineRuntime,
        view_idx: usize,
    ) -> PolarsResult<&(HashSet<String>, HashSet<String>)> {
        if let Some(o) = self.origins.get() {
            return Ok(o);
        }
        let view = &rt.pipeline.views[view_idx];
        let keys = |frames: &[DataFrame]| -> PolarsResult<HashSet<String>> {
            Ok(finish_all(rt, view_idx, frames.to_vec())?
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

/// Per view, the last [`Finished`] answer. Merging and finishing every uncovered partial is
/// the cost of a query; between two changes of the speed state (micro-batches, seals,
/// publishes) every query of a view shares one computation, and concurrent queries after a
/// change wait for the one computing instead of each merging the same partials.
pub struct AnswerCache {
    views: Vec<Mutex<Option<Arc<Finished>>>>,
}

impl AnswerCache {
    pub fn new(views: usize) -> AnswerCache {
        AnswerCache {
            views: (0..views).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The current answer of view `view_idx`, computed if the state changed since the last.
    pub fn get(&self, rt: &PipelineRuntime, view_idx: usize) -> PolarsResult<Arc<Finished>> {
        let mut slot = self.views[view_idx].lock();
        let version = rt.state.read().version();
        if let Some(f) = slot.as_ref()
            && f.version == version
        {
            return Ok(f.clone());
        }
        let finished = Arc::new(compute(rt, view_idx)?);
        *slot = Some(finished.clone());
        Ok(finished)
    }
}

fn compute(rt: &PipelineRuntime, view_idx: usize) -> PolarsResult<Finished> {
    let snap = rt.state.read().snapshot(view_idx);
    let batch_rows = snap
        .batch
        .as_ref()
        .map_or(0, |b| b.partials.height() as u64);
    let speed_rows: u64 = snap.speed.iter().map(|f| f.height() as u64).sum();
    let batch: Vec<DataFrame> = snap.batch.iter().map(|b| b.partials.clone()).collect();
    let mut frames = snap.speed.clone();
    frames.extend(batch.iter().cloned());
    let frame = finish_all(rt, view_idx, frames)?;
    let as_of = AsOf {
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
        computed_at: format_ms(super::time::now_ms()),
    };
    Ok(Finished {
        version: snap.version,
        frame,
        as_of,
        rows: OnceLock::new(),
        batch,
        speed: snap.speed,
        origins: OnceLock::new(),
    })
}

fn filter(df: DataFrame, view: &View, q: &ViewQuery) -> PolarsResult<DataFrame> {
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
    // The all-time window has no start; it spans every range.
    if view.window != Window::All {
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
