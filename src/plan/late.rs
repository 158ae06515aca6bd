//! Late events and what they restate (the restatement ledger): which events of a segment
//! arrived at or after the end of a window they fall in, and how they changed that window's
//! finished row.
//!
//! Lateness is measured against the window end: an event is late for a tumbling window when
//! its arrival is at or after `window_start + size`, for a hopping window likewise with each of
//! the `size / every` windows it is in (it can be late for some and on time for others).
//! Session windows have no fixed end and the all-time window none at all: they have no late
//! events. An entry's delta is `after − before`, where `before` is the row without the
//! segment's events late for that window and `after` the row with them; since a window that
//! has ended only ever gets late events, the deltas of successive segments telescope to the
//! difference between two answers taken between seals.

use std::collections::HashMap;

use polars::prelude::*;
use serde_json::{Map, Value};

use crate::spec::ColumnType;
use crate::spec::expr::dtype;

use super::layout::{PANE_START, ViewLayout, WINDOW_END, WINDOW_START, WindowLayout};
use super::{LookupSet, Plan};

/// Event time in epoch ms, the window a late row counts for, and its lateness.
const T: &str = "__t";
const WS: &str = "__window_start";
const LATENESS: &str = "__lateness";
const LATE_EVENTS: &str = "__late_events";
const MAX_LATENESS: &str = "__max_lateness";

/// Past this many distinct windows, the rows feeding them are selected by one time range
/// (a superset: the rows of other windows in between are finished and then not used).
const MAX_EXACT_WINDOWS: usize = 64;

/// One window and group whose value changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Restated {
    /// `None` for the all-time window.
    pub window_start_ms: Option<i64>,
    pub window_end_ms: Option<i64>,
    /// group_by column → value (JSON, times in RFC 3339).
    pub key: Map<String, Value>,
    /// The segment's events that arrived at or after the window end (0 for a publication).
    pub late_events: u64,
    /// The latest of them: arrival − window end.
    pub max_lateness_ms: i64,
    /// metric → `{"before": …, "after": …, "delta": …}`; `delta` is `after − before` for
    /// numbers (a missing row or null value counts as 0), null for other values.
    pub metrics: Map<String, Value>,
}

/// The frames of one view a segment's restatement is computed from, as served at its seal.
#[derive(Clone, Copy)]
pub struct Restating<'a> {
    /// Every partial frame served besides the segment's own: the batch view's and the other
    /// uncovered segments'.
    pub others: &'a [DataFrame],
    /// The segment's partial frames.
    pub own: &'a [DataFrame],
    /// Windows ending at or before this instant are retired: not served, so not restated.
    pub horizon_ms: Option<i64>,
}

/// How a view's windows sit on event time: `(size, every)` — every window is `size` long and
/// they start every `every` (tumbling: `every = size`); `None` for windows without an end.
fn grid(layout: &ViewLayout) -> Option<(i64, i64)> {
    match layout.window {
        WindowLayout::Tumbling { size } => Some((size, size)),
        WindowLayout::Hopping { size, every } => Some((size, every)),
        WindowLayout::Session { .. } | WindowLayout::All => None,
    }
}

impl Plan {
    /// Whether view `view` can have late events (its windows end).
    pub fn has_window_ends(&self, view: usize) -> bool {
        grid(&self.views[view]).is_some()
    }

    /// What the late events among `events` — a segment's events, with their arrival time (epoch
    /// ms or a timestamp) in column `arrival`, not yet prepared — changed in view `view`'s
    /// finished rows as `served` serves them. Empty when none is late. `lookups` are the
    /// segment's lookup versions.
    pub fn restated(
        &self,
        view: usize,
        events: &DataFrame,
        arrival: &str,
        lookups: &LookupSet,
        served: &Restating<'_>,
    ) -> PolarsResult<Vec<Restated>> {
        let layout = &self.views[view];
        let Some((size, every)) = grid(layout) else {
            return Ok(Vec::new());
        };
        // The event time is usually a column of the events; when it is derived, prepare first.
        let raw = events.column(&layout.event_time).is_ok();
        let events = if raw {
            events.clone()
        } else {
            self.prepare(events.clone().lazy(), lookups)?.collect()?
        };
        let prepare = |df: DataFrame| -> PolarsResult<DataFrame> {
            if raw {
                self.prepare(df.lazy(), lookups)?.collect()
            } else {
                Ok(df)
            }
        };
        let t = col(layout.event_time.as_str())
            .cast(dtype(ColumnType::Timestamp))
            .cast(DataType::Int64);
        let pane = |t: Expr| t.floor_div(lit(every)) * lit(every);
        // Late for at least one window: its first window (the one ending soonest) has ended.
        let late = events
            .clone()
            .lazy()
            .select([col(arrival)
                .cast(DataType::Int64)
                .gt_eq(pane(t.clone()) + lit(every))
                .fill_null(lit(false))
                .alias("__late")])
            .collect()?;
        let late = late.column("__late")?.bool()?.clone();
        if late.num_trues() == 0 {
            return Ok(Vec::new());
        }

        // One row per window and group that got late events.
        let prepared = prepare(events.filter(&late)?)?;
        let keys: Vec<Expr> = layout
            .keys
            .iter()
            .map(|(k, ty)| col(k.as_str()).cast(dtype(*ty)))
            .collect();
        let per_window = (0..size / every)
            .map(|k| {
                let ws = pane(col(T)) - lit(k * every);
                let mut select = vec![ws.clone().alias(WS)];
                select.extend(keys.iter().cloned());
                select
                    .push((col(arrival).cast(DataType::Int64) - (ws + lit(size))).alias(LATENESS));
                prepared
                    .clone()
                    .lazy()
                    .with_column(t.clone().alias(T))
                    .select(select)
                    .filter(col(LATENESS).gt_eq(lit(0i64)))
            })
            .collect::<Vec<_>>();
        let mut by = vec![col(WS)];
        by.extend(layout.keys.iter().map(|(k, _)| col(k.as_str())));
        let mut rows = concat(per_window, UnionArgs::default())?.group_by(by).agg([
            len().cast(DataType::UInt64).alias(LATE_EVENTS),
            col(LATENESS).max().alias(MAX_LATENESS),
        ]);
        if let Some(h) = served.horizon_ms {
            rows = rows.filter((col(WS) + lit(size)).gt(lit(h)));
        }
        let rows = rows.collect()?;
        if rows.height() == 0 {
            return Ok(Vec::new());
        }

        // The rows of those windows before and after the late events: every served frame,
        // cut to the windows (or panes) that feed them; `before` has the segment's other
        // events in place of its own frames.
        let mut windows: Vec<i64> = rows.column(WS)?.i64()?.into_no_null_iter().collect();
        windows.sort_unstable();
        windows.dedup();
        let feeds = |start: Expr| -> Expr {
            let within =
                |lo: i64, hi: i64| start.clone().gt_eq(lit(lo)).and(start.clone().lt(lit(hi)));
            let (first, last) = (windows[0], windows[windows.len() - 1]);
            if windows.len() > MAX_EXACT_WINDOWS {
                return within(first, last + size);
            }
            windows
                .iter()
                .map(|ws| within(*ws, ws + size))
                .reduce(Expr::or)
                .unwrap_or(lit(false))
        };
        let partial_start = match layout.window {
            WindowLayout::Hopping { .. } => PANE_START,
            _ => WINDOW_START,
        };
        let cut = |frames: &[DataFrame]| -> PolarsResult<Vec<DataFrame>> {
            frames
                .iter()
                .map(|f| {
                    f.clone()
                        .lazy()
                        .filter(feeds(col(partial_start).cast(DataType::Int64)))
                        .collect()
                })
                .collect()
        };
        let others = cut(served.others)?;
        let finish = |frames: &[DataFrame], own: &[DataFrame]| -> PolarsResult<DataFrame> {
            let mut acc = self.accumulator(view);
            for f in frames.iter().chain(own) {
                acc.absorb(f)?;
            }
            acc.finish()
        };
        let after = Finished::new(layout, finish(&others, &cut(served.own)?)?)?;
        // Before: the cut frames and the segment's events in those windows that were on time
        // for them (`arrival < the window's end`).
        let fed = events
            .clone()
            .lazy()
            .select([feeds(pane(t.clone())).fill_null(lit(false)).alias("__fed")])
            .collect()?;
        let fed = events.filter(fed.column("__fed")?.bool()?)?;
        let arrival_ms = col(arrival).cast(DataType::Int64);
        let before_of = |lo: i64, hi: i64, on_time: Expr| -> PolarsResult<Finished> {
            let within = |start: Expr| start.clone().gt_eq(lit(lo)).and(start.lt(lit(hi)));
            let frames = others
                .iter()
                .map(|f| {
                    f.clone()
                        .lazy()
                        .filter(within(col(partial_start).cast(DataType::Int64)))
                        .collect()
                })
                .collect::<PolarsResult<Vec<_>>>()?;
            let rest = fed
                .clone()
                .lazy()
                .filter(within(pane(t.clone())).and(on_time))
                .collect()?;
            let rest = self.partials(view, prepare(rest)?.lazy()).collect()?;
            Finished::new(layout, finish(&frames, &[rest])?)
        };
        // Leaving out every event late for at least one of its windows is exact for a window
        // unless one of them was on time for it (a hopping event late only for its earlier
        // windows): those "mixed" windows are finished on their own.
        let on_time_all = arrival_ms.clone().lt(pane(t.clone()) + lit(every));
        let single = before_of(i64::MIN, i64::MAX, on_time_all)?;
        let late_events = events.filter(&late)?;
        let mut mixed = Vec::new();
        for k in 1..size / every {
            let ws = pane(t.clone()) - lit(k * every);
            let found = late_events
                .clone()
                .lazy()
                .filter(arrival_ms.clone().lt(ws.clone() + lit(size)))
                .select([ws.alias(WS)])
                .collect()?;
            mixed.extend(found.column(WS)?.i64()?.into_no_null_iter());
        }
        mixed.sort_unstable();
        mixed.dedup();
        mixed.retain(|ws| windows.binary_search(ws).is_ok());
        let own_before = mixed
            .iter()
            .map(|ws| before_of(*ws, ws + size, arrival_ms.clone().lt(lit(ws + size))))
            .collect::<PolarsResult<Vec<_>>>()?;
        let before_at = |ws: i64| -> &Finished {
            match mixed.binary_search(&ws) {
                Ok(i) => &own_before[i],
                Err(_) => &single,
            }
        };

        let starts = rows.column(WS)?.i64()?;
        let counts = rows.column(LATE_EVENTS)?.u64()?;
        let lateness = rows.column(MAX_LATENESS)?.i64()?;
        let keys = Keys::of(layout, &rows)?;
        let names: Vec<&str> = layout.metrics.iter().map(|m| m.name.as_str()).collect();
        let mut out = Vec::with_capacity(rows.height());
        for r in 0..rows.height() {
            let ws = starts.get(r).unwrap_or_default();
            let key = keys.at(r)?;
            let id = (Some(ws), Value::Object(key.clone()).to_string());
            let (metrics, _) = compare(&names, before_at(ws), &after, &id)?;
            out.push(Restated {
                window_start_ms: Some(ws),
                window_end_ms: Some(ws + size),
                key,
                late_events: counts.get(r).unwrap_or_default(),
                max_lateness_ms: lateness.get(r).unwrap_or_default(),
                metrics,
            });
        }
        // In window, then group order (the group-by's is arbitrary).
        out.sort_by_cached_key(|r| (r.window_start_ms, Value::Object(r.key.clone()).to_string()));
        Ok(out)
    }
}

impl Plan {
    /// The windows and groups whose finished rows differ between two answers of view `view`,
    /// each given as every partial frame it merges and its retention horizon (rows of windows
    /// ending at or before it are not served): a row that appears, disappears or has another
    /// value in any metric. Rows of windows the newer answer retired are left out (retention
    /// is not a restatement).
    pub fn changed(
        &self,
        view: usize,
        before: (&[DataFrame], Option<i64>),
        after: (&[DataFrame], Option<i64>),
    ) -> PolarsResult<Vec<Restated>> {
        self.changed_from(view, (self, before.0, before.1), after)
    }

    /// [`Plan::changed`] between an answer of view `view` by the definition `before.0` (a
    /// promote's old one) and one by this plan: rows are matched by window and group, and
    /// each metric of either definition is compared (a metric one of them lacks is null there).
    pub fn changed_from(
        &self,
        view: usize,
        before: (&Plan, &[DataFrame], Option<i64>),
        after: (&[DataFrame], Option<i64>),
    ) -> PolarsResult<Vec<Restated>> {
        let (old_plan, before_frames, before_horizon) = before;
        let layout = &self.views[view];
        let old_layout = &old_plan.views[view];
        let finish = |plan: &Plan, frames: &[DataFrame]| -> PolarsResult<DataFrame> {
            let mut acc = plan.accumulator(view);
            for f in frames {
                acc.absorb(f)?;
            }
            acc.finish()
        };
        let old = Finished::new(old_layout, finish(old_plan, before_frames)?)?;
        let new = Finished::new(layout, finish(self, after.0)?)?;
        let mut metrics: Vec<&str> = layout.metrics.iter().map(|m| m.name.as_str()).collect();
        for m in &old_layout.metrics {
            if !metrics.contains(&m.name.as_str()) {
                metrics.push(&m.name);
            }
        }
        let served = |end: Option<i64>, horizon: Option<i64>| match (end, horizon) {
            (Some(end), Some(h)) => end > h,
            _ => true,
        };
        let mut ids: Vec<&(Option<i64>, String)> =
            old.index.keys().chain(new.index.keys()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            let end = new.end(id).or(old.end(id));
            if !served(end, after.1) {
                continue;
            }
            let (values, same) = compare(&metrics, &old, &new, id)?;
            let shown = |f: &Finished, horizon| f.row(id).is_some() && served(end, horizon);
            if same && shown(&old, before_horizon) == shown(&new, after.1) {
                continue;
            }
            let key = match serde_json::from_str(&id.1) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            out.push(Restated {
                window_start_ms: id.0,
                window_end_ms: end,
                key,
                late_events: 0,
                max_lateness_ms: 0,
                metrics: values,
            });
        }
        Ok(out)
    }
}

/// Each metric of row `id` before and after (`{"before", "after", "delta"}`), and whether
/// every value is the same.
fn compare(
    names: &[&str],
    before: &Finished,
    after: &Finished,
    id: &(Option<i64>, String),
) -> PolarsResult<(Map<String, Value>, bool)> {
    let (b, a) = (before.row(id), after.row(id));
    let mut metrics = Map::new();
    let mut same = b.is_some() == a.is_some();
    for &name in names {
        let b = b.map_or(Ok(Value::Null), |i| before.value(name, i))?;
        let a = a.map_or(Ok(Value::Null), |i| after.value(name, i))?;
        same &= a == b;
        let delta = match (number(&a), number(&b)) {
            (Some(x), Some(y)) => serde_json::Number::from_f64(x - y).map(Value::Number),
            _ => None,
        };
        let mut cell = Map::new();
        cell.insert("before".into(), b);
        cell.insert("after".into(), a);
        cell.insert("delta".into(), delta.unwrap_or(Value::Null));
        metrics.insert(name.to_string(), Value::Object(cell));
    }
    Ok((metrics, same))
}

/// A frame's group_by columns, read row by row as a JSON object.
struct Keys<'a> {
    names: Vec<&'a str>,
    columns: Vec<&'a Column>,
}

impl<'a> Keys<'a> {
    fn of(layout: &'a ViewLayout, frame: &'a DataFrame) -> PolarsResult<Keys<'a>> {
        let names: Vec<&str> = layout.keys.iter().map(|(k, _)| k.as_str()).collect();
        let columns = names
            .iter()
            .map(|k| frame.column(k))
            .collect::<PolarsResult<_>>()?;
        Ok(Keys { names, columns })
    }

    fn at(&self, row: usize) -> PolarsResult<Map<String, Value>> {
        let mut key = Map::new();
        for (name, c) in self.names.iter().zip(&self.columns) {
            key.insert((*name).to_string(), json(&c.get(row)?));
        }
        Ok(key)
    }
}

/// A view's finished rows, found by window start (`None`: the all-time window) and group key.
struct Finished {
    frame: DataFrame,
    ends: Vec<Option<i64>>,
    index: HashMap<(Option<i64>, String), usize>,
}

impl Finished {
    fn new(layout: &ViewLayout, frame: DataFrame) -> PolarsResult<Finished> {
        let starts = frame.column(WINDOW_START)?.cast(&DataType::Int64)?;
        let starts = starts.i64()?;
        let ends = frame.column(WINDOW_END)?.cast(&DataType::Int64)?;
        let ends: Vec<Option<i64>> = ends.i64()?.iter().collect();
        let keys = Keys::of(layout, &frame)?;
        let mut index = HashMap::with_capacity(frame.height());
        for r in 0..frame.height() {
            index.insert((starts.get(r), Value::Object(keys.at(r)?).to_string()), r);
        }
        Ok(Finished { frame, ends, index })
    }

    fn row(&self, id: &(Option<i64>, String)) -> Option<usize> {
        self.index.get(id).copied()
    }

    fn end(&self, id: &(Option<i64>, String)) -> Option<i64> {
        self.ends[self.row(id)?]
    }

    /// Metric `metric` of row `row`; null when the definition has no such metric.
    fn value(&self, metric: &str, row: usize) -> PolarsResult<Value> {
        match self.frame.column(metric) {
            Ok(c) => Ok(json(&c.get(row)?)),
            Err(_) => Ok(Value::Null),
        }
    }
}

/// A number's value; null counts as 0 (no row yet, or nothing to aggregate).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Null => Some(0.0),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// A cell as JSON: times in RFC 3339, non-finite floats null.
pub fn json(v: &AnyValue) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::Int64(i) => Value::from(*i),
        AnyValue::Int32(i) => Value::from(*i),
        AnyValue::UInt64(i) => Value::from(*i),
        AnyValue::UInt32(i) => Value::from(*i),
        AnyValue::Float64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AnyValue::Float32(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AnyValue::Datetime(t, unit, _) => Value::String(crate::clock::format_ms(match unit {
            TimeUnit::Milliseconds => *t,
            TimeUnit::Microseconds => t.div_euclid(1_000),
            TimeUnit::Nanoseconds => t.div_euclid(1_000_000),
        })),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use polars::prelude::*;
    use serde_json::json;

    use super::Restating;
    use crate::plan::{LookupSet, Plan};

    const PIPELINE: &str = r#"
name: p
source: {type: http}
schema:
  ts: timestamp
  k: string
  x: float
event_time: ts
filter: "x >= 0"
views:
  - name: tumbling
    group_by: [k]
    window: 100ms
    metrics:
      n: count()
      total: sum(x)
      top: max(x)
      label: first(k)
  - name: hop
    window: {hopping: {size: 300ms, every: 100ms}}
    metrics:
      n: count()
  - name: sessions
    window: {session: {gap: 50ms}}
    metrics:
      n: count()
"#;

    fn plan() -> Plan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(dir.path().join("pipelines/p.yaml"), PIPELINE).unwrap();
        let project = crate::spec::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        Plan::compile(&project.pipelines[0]).unwrap()
    }

    /// Events `(ts, k, x, arrival)`, as the speed layer holds them (arrival in `_arrival`).
    fn events(rows: &[(i64, &str, f64, i64)]) -> DataFrame {
        let ts = Int64Chunked::from_iter_values("ts".into(), rows.iter().map(|r| r.0))
            .into_datetime(TimeUnit::Milliseconds, None);
        df!(
            "ts" => ts.into_series(),
            "k" => rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            "x" => rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            "_arrival" => rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn partials(plan: &Plan, view: usize, df: &DataFrame) -> DataFrame {
        plan.partials_all(df.clone(), &LookupSet::default())
            .unwrap()[view]
            .clone()
    }

    /// What `segment` restates in `view` when nothing else is served.
    fn alone(plan: &Plan, view: usize, segment: &DataFrame) -> Vec<super::Restated> {
        let own = vec![partials(plan, view, segment)];
        let served = Restating {
            others: &[],
            own: &own,
            horizon_ms: None,
        };
        plan.restated(view, segment, "_arrival", &LookupSet::default(), &served)
            .unwrap()
    }

    #[test]
    fn late_events_restate_their_windows_and_on_time_ones_do_not() {
        let plan = plan();
        // Served before the segment: window [0, 100) of `a` has 2 events (the batch's).
        let earlier = events(&[(10, "a", 1.0, 20), (20, "a", 5.0, 30)]);
        // The segment: one more on-time event of [0, 100) `a` (arrived at 90), then after the
        // window ended: two late ones of `a` (one filtered out), one of `b` (a new row), and
        // one on time in [100, 200).
        let segment = events(&[
            (30, "a", 2.0, 90),
            (40, "a", 7.0, 150),
            (50, "a", -1.0, 160),
            (60, "b", 3.0, 170),
            (150, "a", 4.0, 180),
        ]);
        let others = vec![partials(&plan, 0, &earlier)];
        let own = vec![partials(&plan, 0, &segment)];
        let served = Restating {
            others: &others,
            own: &own,
            horizon_ms: None,
        };
        let rows = plan
            .restated(0, &segment, "_arrival", &LookupSet::default(), &served)
            .unwrap();
        assert_eq!(rows.len(), 2, "{rows:#?}");
        let a = &rows.iter().find(|r| r.key["k"] == "a").unwrap();
        assert_eq!((a.window_start_ms, a.window_end_ms), (Some(0), Some(100)));
        assert_eq!((a.late_events, a.max_lateness_ms), (1, 50));
        // Before: the batch's two and the on-time one; after: plus the late 7.
        assert_eq!(
            a.metrics["n"],
            json!({"before": 3, "after": 4, "delta": 1.0})
        );
        assert_eq!(
            a.metrics["total"],
            json!({"before": 8.0, "after": 15.0, "delta": 7.0})
        );
        assert_eq!(
            a.metrics["top"],
            json!({"before": 5.0, "after": 7.0, "delta": 2.0})
        );
        // Not a number: before and after only.
        assert_eq!(
            a.metrics["label"],
            json!({"before": "a", "after": "a", "delta": null})
        );
        let b = &rows.iter().find(|r| r.key["k"] == "b").unwrap();
        assert_eq!((b.late_events, b.max_lateness_ms), (1, 70));
        assert_eq!(
            b.metrics["n"],
            json!({"before": null, "after": 1, "delta": 1.0})
        );

        // Retired windows are not served, so not restated.
        let retired = Restating {
            horizon_ms: Some(100),
            ..served
        };
        let none = plan.restated(0, &segment, "_arrival", &LookupSet::default(), &retired);
        assert!(none.unwrap().is_empty());
    }

    #[test]
    fn a_hopping_event_is_late_only_for_the_windows_that_ended() {
        let plan = plan();
        // At t = 250, arriving at 320: its windows are [0, 300) (ended), [100, 400) and
        // [200, 500) (open).
        let segment = events(&[(250, "a", 1.0, 320)]);
        let rows = alone(&plan, 1, &segment);
        assert_eq!(rows.len(), 1, "{rows:#?}");
        assert_eq!(
            (rows[0].window_start_ms, rows[0].window_end_ms),
            (Some(0), Some(300))
        );
        assert_eq!((rows[0].late_events, rows[0].max_lateness_ms), (1, 20));
        assert_eq!(
            rows[0].metrics["n"],
            json!({"before": null, "after": 1, "delta": 1.0})
        );
        // One segment: the same event, and one at t = 150 arriving at 410, late for all three of
        // its windows ([-100, 200), [0, 300), [100, 400)). [100, 400) counts only that one as
        // late: the first was on time for it, so it is in the row before as well.
        let segment = events(&[(250, "a", 1.0, 320), (150, "a", 1.0, 410)]);
        let rows = alone(&plan, 1, &segment);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.window_start_ms, r.late_events, r.metrics["n"].clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some(-100),
                    1,
                    json!({"before": null, "after": 1, "delta": 1.0})
                ),
                (
                    Some(0),
                    2,
                    json!({"before": null, "after": 2, "delta": 2.0})
                ),
                (Some(100), 1, json!({"before": 1, "after": 2, "delta": 1.0})),
            ],
            "{rows:#?}"
        );

        // Sessions have no fixed end: never late.
        assert!(!plan.has_window_ends(2));
        assert!(alone(&plan, 2, &segment).is_empty());
    }
}
