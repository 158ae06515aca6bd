//! Prepared events → partials (format v1), as one lazy polars query per view.
//!
//! Window assignment and every state are polars expressions in one group-by; the two sketches
//! are a per-row code computed by a column function (stable xxh64 / log-bucket) that the
//! group-by collects per group and a second column function reduces to the sketch. Every
//! aggregation but first/last and sessions is one polars' streaming engine runs as it reads
//! (the batch layer's case); those two make it collect their view's events first.

use std::collections::HashSet;

use polars::prelude::*;

use crate::spec::ColumnType;
use crate::spec::expr::dtype;

use super::layout::{
    Agg, MetricLayout, PANE_START, ROWS, SESSION_LAST, StateCol, ViewLayout, WINDOW_START,
    WindowLayout,
};
use super::{hll, quantile};

/// Event time as epoch milliseconds.
const T: &str = "__t";
/// Session number within the sorted frame.
const SID: &str = "__sid";
/// Constant key of an all-time view without group_by.
const ALL: &str = "__all";

pub(crate) fn partials(layout: &ViewLayout, prepared: LazyFrame) -> LazyFrame {
    let ms = dtype(ColumnType::Timestamp);
    // Only what the view reads, in canonical types (a no-op for plan-prepared frames; it
    // normalises Parquet written with other widths).
    // Event time only where the view reads it: windows, first/last. An all-time view of other
    // metrics leaves the column unread (projection pushdown keeps it out of the scan) — unless
    // it reads no other column either: a selection of no column has no rows to count.
    let reads_time = !matches!(layout.window, WindowLayout::All)
        || layout
            .metrics
            .iter()
            .any(|m| matches!(m.agg, Agg::First | Agg::Last))
        || (layout.keys.is_empty() && layout.metrics.iter().all(|m| m.input.is_none()));
    let mut select = Vec::new();
    if reads_time {
        select.push(
            col(layout.event_time.as_str())
                .cast(ms.clone())
                .cast(DataType::Int64)
                .alias(T),
        );
    }
    let mut seen = HashSet::new();
    let inputs = layout.metrics.iter().filter_map(|m| m.input.as_ref());
    for (name, t) in layout.keys.iter().chain(inputs) {
        if seen.insert(name.as_str()) {
            select.push(col(name.as_str()).cast(dtype(*t)).alias(name.as_str()));
        }
    }
    let base = prepared.select(select);
    let key_cols: Vec<Expr> = layout.keys.iter().map(|(k, _)| col(k.as_str())).collect();

    let floor =
        |size: i64, name: &str| (col(T).floor_div(lit(size)) * lit(size)).alias(name.to_string());
    let (base, group): (LazyFrame, Vec<&str>) = match layout.window {
        WindowLayout::Tumbling { size } => (
            base.with_column(floor(size, WINDOW_START)),
            vec![WINDOW_START],
        ),
        WindowLayout::Hopping { every, .. } => {
            (base.with_column(floor(every, PANE_START)), vec![PANE_START])
        }
        WindowLayout::Session { gap } => {
            let mut by: Vec<PlSmallStr> =
                layout.keys.iter().map(|(k, _)| k.as_str().into()).collect();
            by.push(T.into());
            // A session starts at a key's first event and wherever its events are `gap` apart.
            let mut new = (col(T) - col(T).shift(lit(1)))
                .gt_eq(lit(gap))
                .fill_null(lit(true));
            for k in &key_cols {
                new = new.or(k.clone().neq_missing(k.clone().shift(lit(1))));
            }
            let sessions = base
                .sort(by, SortMultipleOptions::default())
                .with_column(new.cast(DataType::UInt32).cum_sum(false).alias(SID));
            (sessions, vec![SID])
        }
        WindowLayout::All if layout.keys.is_empty() => {
            (base.with_column(lit(0i32).alias(ALL)), vec![ALL])
        }
        WindowLayout::All => (base, vec![]),
    };
    let mut group_cols: Vec<Expr> = group.iter().map(|g| col(*g)).collect();
    let session = matches!(layout.window, WindowLayout::Session { .. });
    if !session {
        group_cols.extend(key_cols.iter().cloned());
    }

    // Sketch metrics: a code per row now, collected per group by the group-by below, then
    // reduced to the canonical sketch by a column function.
    let mut base = base;
    for (i, m) in layout.metrics.iter().enumerate() {
        let v = col(m.input_name());
        match m.agg {
            Agg::Distinct => {
                base = base.with_column(code(v, hll::codes, DataType::UInt32).alias(raw(i)))
            }
            Agg::Quantile(_) => {
                base = base.with_column(code(v, quantile::codes, DataType::Int32).alias(raw(i)))
            }
            _ => {}
        }
    }

    let mut aggs = vec![len().cast(DataType::UInt64).alias(ROWS)];
    if session {
        aggs.push(col(T).min().alias(WINDOW_START));
        aggs.push(col(T).max().alias(SESSION_LAST));
        aggs.extend(key_cols.iter().map(|k| k.clone().first()));
    }
    let mut reduce = Vec::new();
    for (i, m) in layout.metrics.iter().enumerate() {
        aggs.extend(metric_aggs(m));
        let list = |f: fn(&Column) -> PolarsResult<Column>, out: DataType, s: StateCol| {
            col(raw(i))
                .map(
                    move |c| f(&c),
                    move |_, field| Ok(Field::new(field.name().clone(), out.clone())),
                )
                .alias(m.state_name(s))
        };
        // `implode(false)`: an unordered list of the group's codes (the reduction sorts
        // them), which polars' streaming engine aggregates as it goes — an implicit list
        // would make it fall back to collecting every event in memory first.
        match m.agg {
            Agg::Distinct => {
                aggs.push(col(raw(i)).implode(false));
                reduce.push(list(
                    hll::reduce_lists,
                    DataType::List(Box::new(DataType::UInt32)),
                    StateCol::Hll,
                ));
            }
            Agg::Quantile(_) => {
                aggs.push(col(raw(i)).implode(false));
                reduce.push(list(
                    |c| quantile::reduce_lists(c, false),
                    DataType::List(Box::new(DataType::Int32)),
                    StateCol::DdBucket,
                ));
                reduce.push(list(
                    |c| quantile::reduce_lists(c, true),
                    DataType::List(Box::new(DataType::UInt64)),
                    StateCol::DdCount,
                ));
            }
            _ => {}
        }
    }
    let mut out = base.group_by(group_cols).agg(aggs);
    if !reduce.is_empty() {
        out = out.with_columns(reduce);
    }

    let mut columns: Vec<Expr> = layout
        .window_columns()
        .iter()
        .map(|w| col(*w).cast(ms.clone()))
        .collect();
    columns.extend(key_cols);
    columns.push(col(ROWS));
    for m in &layout.metrics {
        for s in m.states() {
            let name = m.state_name(*s);
            columns.push(col(name.as_str()).cast(m.state_dtype(*s)));
        }
    }
    out.select(columns)
}

/// The plain-aggregate states of one metric, as group-by aggregations.
fn metric_aggs(m: &MetricLayout) -> Vec<Expr> {
    let v = col(m.input_name());
    let name = |s: StateCol| m.state_name(s);
    let n = || {
        v.clone()
            .count()
            .cast(DataType::UInt64)
            .alias(name(StateCol::N))
    };
    match m.agg {
        Agg::Count | Agg::Distinct | Agg::Quantile(_) => vec![],
        Agg::CountCol => vec![n()],
        Agg::Sum | Agg::Avg => vec![v.clone().sum().alias(name(StateCol::Sum)), n()],
        Agg::Min => vec![v.min().alias(name(StateCol::Min))],
        Agg::Max => vec![v.max().alias(name(StateCol::Max))],
        Agg::Variance | Agg::Stddev => {
            // Σ(x − mean)² as n · population variance: polars computes the variance in one
            // stable pass (Welford) that its streaming engine can aggregate, where a sum over
            // `x - mean()` needs every event of the group at once. 0 for a group of nulls.
            let f = v.clone().cast(DataType::Float64);
            let m2 = f.clone().var(0) * f.clone().count().cast(DataType::Float64);
            vec![
                n(),
                f.mean().alias(name(StateCol::Mean)),
                m2.fill_null(lit(0.0)).alias(name(StateCol::M2)),
            ]
        }
        Agg::First | Agg::Last => {
            // Earliest (latest) time with a value; among equal times the smallest (largest)
            // value, so the pick never depends on how events were split into batches.
            let present = v.clone().is_not_null();
            let times = col(T).filter(present.clone());
            let t = if m.agg == Agg::First {
                times.min()
            } else {
                times.max()
            };
            let at_t = v.filter(present.and(col(T).eq(t.clone())));
            let pick = if m.agg == Agg::First {
                at_t.min()
            } else {
                at_t.max()
            };
            vec![t.alias(name(StateCol::T)), pick.alias(name(StateCol::V))]
        }
    }
}

/// Raw per-row sketch codes of metric `i`, collected into a list per group.
fn raw(i: usize) -> String {
    format!("__codes{i}")
}

/// A column function computing per-row sketch codes.
fn code(v: Expr, f: fn(&Column) -> PolarsResult<Column>, out: DataType) -> Expr {
    v.map(
        move |c| f(&c),
        move |_, field| Ok(Field::new(field.name().clone(), out.clone())),
    )
}
