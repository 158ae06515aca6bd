//! Answering a view query: batch view ⊕ speed partials of the segments it does not cover,
//! taken under one snapshot, merged and finished by the plan, then filtered by keys and time.

use std::collections::{BTreeMap, HashSet};

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
#[derive(Debug, Serialize)]
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
    let snap = rt.state.read().snapshot(view_idx);
    let batch_rows = snap
        .batch
        .as_ref()
        .map_or(0, |b| b.partials.height() as u64);
    let speed_rows: u64 = snap.speed.iter().map(|f| f.height() as u64).sum();
    let answer_of = |frames: Vec<DataFrame>| -> Result<Vec<Value>, QueryError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let merged = rt.plan.merge(view_idx, frames)?;
        let finished = rt.plan.finish(view_idx, merged)?;
        Ok(rows_json(&filter(finished, view, q)?))
    };
    let mut frames = snap.speed.clone();
    if let Some(b) = &snap.batch {
        frames.push(b.partials.clone());
    }
    let cols = columns(view);
    let mut rows = answer_of(frames)?;
    if q.origin {
        let key = |row: &Value| -> String {
            let mut k = row["window_start"].to_string();
            for g in &view.group_by {
                k.push('\u{1}');
                k.push_str(&row[g.as_str()].to_string());
            }
            k
        };
        let keys = |rows: Vec<Value>| rows.iter().map(key).collect::<HashSet<String>>();
        let from_batch = keys(answer_of(
            snap.batch.iter().map(|b| b.partials.clone()).collect(),
        )?);
        let from_speed = keys(answer_of(snap.speed)?);
        for row in &mut rows {
            let k = key(row);
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
    Ok(Answer {
        columns: cols,
        rows,
        as_of,
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
