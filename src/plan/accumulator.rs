//! The in-memory form of a view's partials: a hash map from group to merged states.
//!
//! This is where partials merge — for `Plan::merge`, for `Plan::finish`, and for the speed
//! layer, which keeps one accumulator per segment and absorbs each micro-batch's partials into
//! it at a cost proportional to the micro-batch, not to the segment. There is exactly one
//! merge implementation, so every layer combines partials by the same rules.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use polars::prelude::*;

use crate::spec::ColumnType;

use super::hll::Registers;
use super::layout::{
    Agg, MetricLayout, ROWS, StateCol, ViewLayout, WINDOW_END, WINDOW_START, WindowLayout,
};
use super::quantile::Histogram;
use super::value::{Builder, Reader, Value, datetime_column};

/// Mergeable partials of one view, held in memory.
#[derive(Debug, Clone)]
pub struct Accumulator {
    layout: Arc<ViewLayout>,
    /// Tumbling, hopping (per pane) and all-time groups.
    groups: HashMap<GroupKey, Group>,
    /// Session views: per key, sessions by start. Invariant: no two sessions of a key come
    /// within `gap` of each other (they would have been merged).
    sessions: HashMap<Box<[Value]>, BTreeMap<i64, Session>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    /// Window start (tumbling), pane start (hopping), `None` for all-time.
    start: Option<i64>,
    keys: Box<[Value]>,
}

#[derive(Debug, Clone)]
struct Group {
    rows: u64,
    states: Vec<State>,
}

#[derive(Debug, Clone)]
struct Session {
    last: i64,
    group: Group,
}

#[derive(Debug, Clone)]
enum State {
    /// `count()` keeps nothing beyond the group's rows.
    Empty,
    Count(u64),
    SumInt {
        sum: i64,
        n: u64,
    },
    SumFloat {
        sum: f64,
        n: u64,
    },
    Min(Option<Value>),
    Max(Option<Value>),
    /// Count, mean and sum of squared deviations: merges without catastrophic cancellation.
    Moments {
        n: u64,
        mean: f64,
        m2: f64,
    },
    /// (event time, value) of the first/last non-null value.
    First(Option<(i64, Value)>),
    Last(Option<(i64, Value)>),
    Hll(Registers),
    Quantile(Histogram),
}

impl State {
    fn merge(&mut self, other: State) {
        match (self, other) {
            (State::Count(a), State::Count(b)) => *a = a.saturating_add(b),
            (State::SumInt { sum, n }, State::SumInt { sum: s, n: m }) => {
                // Wrapping, like polars' own Int64 sum, so the order of merging never matters.
                *sum = sum.wrapping_add(s);
                *n = n.saturating_add(m);
            }
            (State::SumFloat { sum, n }, State::SumFloat { sum: s, n: m }) => {
                *sum += s;
                *n = n.saturating_add(m);
            }
            (State::Min(a), State::Min(Some(b))) if a.as_ref().is_none_or(|a| b < *a) => {
                *a = Some(b);
            }
            (State::Max(a), State::Max(Some(b))) if a.as_ref().is_none_or(|a| b > *a) => {
                *a = Some(b);
            }
            (
                State::Moments { n, mean, m2 },
                State::Moments {
                    n: nb,
                    mean: mb,
                    m2: m2b,
                },
            ) => {
                if nb == 0 {
                    return;
                }
                if *n == 0 {
                    (*n, *mean, *m2) = (nb, mb, m2b);
                    return;
                }
                // Chan et al.: combine two (count, mean, M2) summaries.
                let (na, nbf) = (*n as f64, nb as f64);
                let total = na + nbf;
                let delta = mb - *mean;
                *mean += delta * nbf / total;
                *m2 += m2b + delta * delta * na * nbf / total;
                *n = n.saturating_add(nb);
            }
            (State::First(a), State::First(Some(b))) if a.as_ref().is_none_or(|a| b < *a) => {
                *a = Some(b);
            }
            (State::Last(a), State::Last(Some(b))) if a.as_ref().is_none_or(|a| b > *a) => {
                *a = Some(b);
            }
            (State::Hll(a), State::Hll(b)) => a.merge(&b),
            (State::Quantile(a), State::Quantile(b)) => a.merge(&b),
            // Nothing to add (an empty min/max/first/last), or `count()`.
            _ => {}
        }
    }
}

impl Group {
    fn merge(&mut self, other: Group) {
        // Saturating: partials read from files are not trusted to be sane.
        self.rows = self.rows.saturating_add(other.rows);
        for (a, b) in self.states.iter_mut().zip(other.states) {
            a.merge(b);
        }
    }
}

/// One group on its way out: start, session last event, keys, states.
type Row<'a> = (Option<i64>, Option<i64>, &'a [Value], &'a Group);

/// Typed views of one partial frame's columns.
struct Columns<'a> {
    window: Vec<&'a Int64Chunked>,
    keys: Vec<Reader<'a>>,
    rows: &'a UInt64Chunked,
    /// Per metric, per state column.
    states: Vec<Vec<StateColumn<'a>>>,
}

enum StateColumn<'a> {
    U64(&'a UInt64Chunked),
    F64(&'a Float64Chunked),
    Time(&'a Int64Chunked),
    Value(Reader<'a>),
    List(&'a ListChunked),
}

impl Accumulator {
    pub(crate) fn new(layout: Arc<ViewLayout>) -> Accumulator {
        Accumulator {
            layout,
            groups: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// Number of groups (sessions for session views) held.
    pub fn len(&self) -> usize {
        self.groups.len() + self.sessions.values().map(BTreeMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Merges a partial frame of this view (from `Plan::partials`, `Plan::merge`,
    /// `to_partials` or a partials Parquet file) into this accumulator.
    pub fn absorb(&mut self, frame: &DataFrame) -> PolarsResult<()> {
        let layout = Arc::clone(&self.layout);
        let schema = layout.partial_schema();
        let mut series = Vec::with_capacity(schema.len());
        for (name, dtype) in schema.iter() {
            let s = frame
                .column(name)
                .map_err(|_| {
                    polars_err!(ColumnNotFound: "partials of view `{}` have no column `{name}` (format v{})", layout.view, super::PARTIALS_FORMAT_VERSION)
                })?
                .as_materialized_series()
                .rechunk();
            if s.dtype() != dtype {
                polars_bail!(SchemaMismatch: "partials of view `{}`: column `{name}` is {} where format v{} has {dtype}", layout.view, s.dtype(), super::PARTIALS_FORMAT_VERSION);
            }
            series.push(s);
        }
        let cols = columns(&layout, &series)?;
        for r in 0..frame.height() {
            let rows = cols.rows.get(r).unwrap_or(0);
            if rows == 0 {
                continue;
            }
            let keys: Box<[Value]> = cols.keys.iter().map(|k| k.get(r)).collect();
            let states = layout
                .metrics
                .iter()
                .zip(&cols.states)
                .map(|(m, c)| read_state(m, c, r))
                .collect::<PolarsResult<Vec<_>>>()?;
            let group = Group { rows, states };
            match layout.window {
                WindowLayout::Session { gap } => {
                    let (Some(start), Some(last)) = (cols.window[0].get(r), cols.window[1].get(r))
                    else {
                        polars_bail!(ComputeError: "partials of view `{}`: a session without start or end", layout.view);
                    };
                    self.add_session(gap, keys, start, last, group);
                }
                WindowLayout::All => self.add(GroupKey { start: None, keys }, group),
                _ => self.add(
                    GroupKey {
                        start: cols.window[0].get(r),
                        keys,
                    },
                    group,
                ),
            }
        }
        Ok(())
    }

    /// Merges another accumulator of the same view into this one.
    pub fn merge(&mut self, other: Accumulator) {
        for (key, group) in other.groups {
            self.add(key, group);
        }
        if let WindowLayout::Session { gap } = self.layout.window {
            for (keys, sessions) in other.sessions {
                for (start, s) in sessions {
                    self.add_session(gap, keys.clone(), start, s.last, s.group);
                }
            }
        }
    }

    fn add(&mut self, key: GroupKey, group: Group) {
        match self.groups.entry(key) {
            Entry::Occupied(mut e) => e.get_mut().merge(group),
            Entry::Vacant(e) => {
                e.insert(group);
            }
        }
    }

    /// Adds a session `[start, last + gap)`, merging every held session it overlaps.
    fn add_session(&mut self, gap: i64, keys: Box<[Value]>, start: i64, last: i64, group: Group) {
        let sessions = self.sessions.entry(keys).or_default();
        let (mut start, mut last, mut group) = (start, last, group);
        // Held sessions are disjoint, so ordered by start they are ordered by end too: walk
        // back from the last one starting before our end while they reach past our start.
        let overlapping: Vec<i64> = sessions
            .range(..last.saturating_add(gap))
            .rev()
            .take_while(|(_, s)| s.last.saturating_add(gap) > start)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapping {
            if let Some(s) = sessions.remove(&k) {
                start = start.min(k);
                last = last.max(s.last);
                group.merge(s.group);
            }
        }
        sessions.insert(start, Session { last, group });
    }

    /// Groups in output order: window start, then keys (null last).
    fn sorted(&self) -> Vec<Row<'_>> {
        let mut out: Vec<_> = self
            .groups
            .iter()
            .map(|(k, g)| (k.start, None, &k.keys[..], g))
            .chain(self.sessions.iter().flat_map(|(keys, sessions)| {
                sessions
                    .iter()
                    .map(move |(start, s)| (Some(*start), Some(s.last), &keys[..], &s.group))
            }))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(b.2)));
        out
    }

    /// The canonical partial frame (format v1), sorted by window then keys.
    pub fn to_partials(&self) -> PolarsResult<DataFrame> {
        let layout = &self.layout;
        let rows = self.sorted();
        let n = rows.len();
        let mut cols: Vec<Column> = Vec::new();
        let window_names = layout.window_columns();
        if let Some(name) = window_names.first() {
            cols.push(datetime_column(name, rows.iter().map(|r| r.0).collect()));
        }
        if let Some(name) = window_names.get(1) {
            cols.push(datetime_column(name, rows.iter().map(|r| r.1).collect()));
        }
        cols.extend(key_columns(layout, &rows));
        cols.push(Column::new(
            ROWS.into(),
            rows.iter().map(|r| r.3.rows).collect::<Vec<u64>>(),
        ));
        for (i, m) in layout.metrics.iter().enumerate() {
            for s in m.states() {
                cols.push(state_column(m, *s, rows.iter().map(|r| &r.3.states[i]))?);
            }
        }
        DataFrame::new(n, cols)
    }

    /// Finished rows: window_start, window_end, group_by columns, then the metrics.
    pub fn finish(&self) -> PolarsResult<DataFrame> {
        let layout = &self.layout;
        let expanded;
        let source = match layout.window {
            WindowLayout::Hopping { size, every } => {
                // Each pane belongs to the size/every windows that start at or before it.
                let mut windows = Accumulator::new(Arc::clone(&self.layout));
                for (key, group) in &self.groups {
                    let Some(pane) = key.start else { continue };
                    for j in 0..size / every {
                        windows.add(
                            GroupKey {
                                start: Some(pane.saturating_sub(j.saturating_mul(every))),
                                keys: key.keys.clone(),
                            },
                            group.clone(),
                        );
                    }
                }
                expanded = windows;
                &expanded
            }
            _ => self,
        };
        let rows = source.sorted();
        let n = rows.len();
        let (starts, ends): (Vec<Option<i64>>, Vec<Option<i64>>) = rows
            .iter()
            .map(|r| match layout.window {
                WindowLayout::Tumbling { size } | WindowLayout::Hopping { size, .. } => {
                    (r.0, r.0.map(|s| s.saturating_add(size)))
                }
                WindowLayout::Session { gap } => (r.0, r.1.map(|l| l.saturating_add(gap))),
                WindowLayout::All => (None, None),
            })
            .unzip();
        let mut cols = vec![
            datetime_column(WINDOW_START, starts),
            datetime_column(WINDOW_END, ends),
        ];
        cols.extend(key_columns(layout, &rows));
        for (i, m) in layout.metrics.iter().enumerate() {
            cols.push(finish_column(
                m,
                rows.iter().map(|r| (r.3.rows, &r.3.states[i])),
            ));
        }
        DataFrame::new(n, cols)
    }
}

fn key_columns(layout: &ViewLayout, rows: &[Row]) -> Vec<Column> {
    layout
        .keys
        .iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let mut b = Builder::new(name, *t, rows.len());
            for r in rows {
                b.push(r.2.get(i));
            }
            b.finish()
        })
        .collect()
}

fn columns<'a>(layout: &ViewLayout, series: &'a [Series]) -> PolarsResult<Columns<'a>> {
    let mut it = series.iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| polars_err!(ComputeError: "partials frame is missing columns"))
    };
    let mut window = Vec::new();
    for _ in layout.window_columns() {
        window.push(next()?.datetime()?.physical());
    }
    let mut keys = Vec::new();
    for (_, t) in &layout.keys {
        keys.push(Reader::new(next()?, *t)?);
    }
    let rows = next()?.u64()?;
    let mut states = Vec::new();
    for m in &layout.metrics {
        let mut cols = Vec::new();
        for s in m.states() {
            let series = next()?;
            cols.push(match s {
                StateCol::N => StateColumn::U64(series.u64()?),
                StateCol::Mean | StateCol::M2 => StateColumn::F64(series.f64()?),
                StateCol::T => StateColumn::Time(series.datetime()?.physical()),
                StateCol::Sum | StateCol::Min | StateCol::Max | StateCol::V => {
                    StateColumn::Value(Reader::new(series, m.input_type())?)
                }
                StateCol::Hll | StateCol::DdBucket | StateCol::DdCount => {
                    StateColumn::List(series.list()?)
                }
            });
        }
        states.push(cols);
    }
    Ok(Columns {
        window,
        keys,
        rows,
        states,
    })
}

fn u64_at(c: &StateColumn, r: usize) -> u64 {
    match c {
        StateColumn::U64(c) => c.get(r).unwrap_or(0),
        _ => 0,
    }
}

fn f64_at(c: &StateColumn, r: usize) -> Option<f64> {
    match c {
        StateColumn::F64(c) => c.get(r),
        _ => None,
    }
}

fn value_at(c: &StateColumn, r: usize) -> Value {
    match c {
        StateColumn::Value(c) => c.get(r),
        _ => Value::Null,
    }
}

fn time_at(c: &StateColumn, r: usize) -> Option<i64> {
    match c {
        StateColumn::Time(c) => c.get(r),
        _ => None,
    }
}

/// The list at row `r` (empty when null).
fn list_at(c: &StateColumn, r: usize) -> Series {
    match c {
        StateColumn::List(c) => c.get_as_series(r),
        _ => None,
    }
    .unwrap_or_else(|| Series::new_empty(PlSmallStr::EMPTY, &DataType::Null))
}

fn read_state(m: &MetricLayout, c: &[StateColumn], r: usize) -> PolarsResult<State> {
    Ok(match m.agg {
        Agg::Count => State::Empty,
        Agg::CountCol => State::Count(u64_at(&c[0], r)),
        Agg::Sum | Agg::Avg => {
            let n = u64_at(&c[1], r);
            match (value_at(&c[0], r), m.input_type()) {
                (Value::Int(sum), _) => State::SumInt { sum, n },
                (Value::Float(sum), _) => State::SumFloat { sum, n },
                (_, ColumnType::Float) => State::SumFloat { sum: 0.0, n },
                _ => State::SumInt { sum: 0, n },
            }
        }
        Agg::Min => State::Min(Some(value_at(&c[0], r)).filter(|v| !v.is_null())),
        Agg::Max => State::Max(Some(value_at(&c[0], r)).filter(|v| !v.is_null())),
        Agg::Variance | Agg::Stddev => {
            let n = u64_at(&c[0], r);
            match (n, f64_at(&c[1], r)) {
                (0, _) | (_, None) => State::Moments {
                    n: 0,
                    mean: 0.0,
                    m2: 0.0,
                },
                (n, Some(mean)) => State::Moments {
                    n,
                    mean,
                    m2: f64_at(&c[2], r).unwrap_or(0.0),
                },
            }
        }
        Agg::First | Agg::Last => {
            let pick = match (time_at(&c[0], r), value_at(&c[1], r)) {
                (Some(t), v) if !v.is_null() => Some((t, v)),
                _ => None,
            };
            if m.agg == Agg::First {
                State::First(pick)
            } else {
                State::Last(pick)
            }
        }
        Agg::Distinct => {
            let mut regs = Registers::default();
            let codes = list_at(&c[0], r).cast(&DataType::UInt32)?;
            regs.insert_all(codes.u32()?.iter().flatten().collect());
            State::Hll(regs)
        }
        Agg::Quantile(_) => {
            let buckets = list_at(&c[0], r).cast(&DataType::Int32)?;
            let buckets: Vec<i32> = buckets.i32()?.iter().flatten().collect();
            let counts = list_at(&c[1], r).cast(&DataType::UInt64)?;
            let counts: Vec<u64> = counts.u64()?.iter().flatten().collect();
            if buckets.len() != counts.len() {
                polars_bail!(ComputeError: "partials of metric `{}`: {} buckets but {} counts", m.name, buckets.len(), counts.len());
            }
            let mut h = Histogram::default();
            h.insert_all(buckets.into_iter().zip(counts).collect());
            State::Quantile(h)
        }
    })
}

/// One state column of the canonical partial frame.
fn state_column<'a>(
    m: &MetricLayout,
    s: StateCol,
    states: impl ExactSizeIterator<Item = &'a State>,
) -> PolarsResult<Column> {
    let name = m.state_name(s);
    let n = states.len();
    Ok(match s {
        StateCol::N => {
            let v: Vec<u64> = states
                .map(|st| match st {
                    State::Count(n) | State::SumInt { n, .. } | State::SumFloat { n, .. } => *n,
                    State::Moments { n, .. } => *n,
                    _ => 0,
                })
                .collect();
            Column::new(name.into(), v)
        }
        StateCol::Mean | StateCol::M2 => {
            let v: Vec<Option<f64>> = states
                .map(|st| match st {
                    State::Moments { n: 0, .. } if s == StateCol::Mean => None,
                    State::Moments { mean, .. } if s == StateCol::Mean => Some(*mean),
                    State::Moments { m2, .. } => Some(*m2),
                    _ => None,
                })
                .collect();
            Column::new(name.into(), v)
        }
        StateCol::T => datetime_column(
            &name,
            states
                .map(|st| match st {
                    State::First(Some((t, _))) | State::Last(Some((t, _))) => Some(*t),
                    _ => None,
                })
                .collect(),
        ),
        StateCol::Sum | StateCol::Min | StateCol::Max | StateCol::V => {
            let mut b = Builder::new(&name, m.input_type(), n);
            for st in states {
                let v = match st {
                    State::SumInt { sum, .. } => Some(Value::Int(*sum)),
                    State::SumFloat { sum, .. } => Some(Value::Float(*sum)),
                    State::Min(v) | State::Max(v) => v.clone(),
                    State::First(p) | State::Last(p) => p.as_ref().map(|p| p.1.clone()),
                    _ => None,
                };
                b.push(v.as_ref());
            }
            b.finish()
        }
        StateCol::Hll => {
            let mut b = ListPrimitiveChunkedBuilder::<UInt32Type>::new(
                name.into(),
                n,
                n * 8,
                DataType::UInt32,
            );
            for st in states {
                match st {
                    State::Hll(r) => b.append_slice(&r.codes()),
                    _ => b.append_slice(&[]),
                }
            }
            b.finish().into_column()
        }
        StateCol::DdBucket => {
            let mut b = ListPrimitiveChunkedBuilder::<Int32Type>::new(
                name.into(),
                n,
                n * 8,
                DataType::Int32,
            );
            for st in states {
                let codes: Vec<i32> = match st {
                    State::Quantile(h) => h.buckets.iter().map(|b| b.0).collect(),
                    _ => Vec::new(),
                };
                b.append_slice(&codes);
            }
            b.finish().into_column()
        }
        StateCol::DdCount => {
            let mut b = ListPrimitiveChunkedBuilder::<UInt64Type>::new(
                name.into(),
                n,
                n * 8,
                DataType::UInt64,
            );
            for st in states {
                let counts: Vec<u64> = match st {
                    State::Quantile(h) => h.buckets.iter().map(|b| b.1).collect(),
                    _ => Vec::new(),
                };
                b.append_slice(&counts);
            }
            b.finish().into_column()
        }
    })
}

/// One metric's finished column from `(group rows, state)` pairs.
fn finish_column<'a>(
    m: &MetricLayout,
    states: impl ExactSizeIterator<Item = (u64, &'a State)>,
) -> Column {
    let name = m.name.as_str();
    let n = states.len();
    let ints = |v: Vec<Option<i64>>| Column::new(name.into(), v);
    let floats = |v: Vec<Option<f64>>| Column::new(name.into(), v);
    match m.agg {
        Agg::Count => ints(states.map(|(rows, _)| Some(rows as i64)).collect()),
        Agg::CountCol => ints(
            states
                .map(|(_, st)| match st {
                    State::Count(n) => Some(*n as i64),
                    _ => Some(0),
                })
                .collect(),
        ),
        Agg::Avg => floats(
            states
                .map(|(_, st)| match st {
                    State::SumInt { sum, n } if *n > 0 => Some(*sum as f64 / *n as f64),
                    State::SumFloat { sum, n } if *n > 0 => Some(*sum / *n as f64),
                    _ => None,
                })
                .collect(),
        ),
        Agg::Variance | Agg::Stddev => floats(
            states
                .map(|(_, st)| match st {
                    State::Moments { n, m2, .. } if *n >= 2 => {
                        let var = m2.max(0.0) / (*n - 1) as f64;
                        Some(if m.agg == Agg::Stddev {
                            var.sqrt()
                        } else {
                            var
                        })
                    }
                    _ => None,
                })
                .collect(),
        ),
        Agg::Distinct => ints(
            states
                .map(|(_, st)| match st {
                    State::Hll(r) => Some(r.estimate().round() as i64),
                    _ => Some(0),
                })
                .collect(),
        ),
        Agg::Quantile(q) => floats(
            states
                .map(|(_, st)| match st {
                    State::Quantile(h) => h.quantile(q),
                    _ => None,
                })
                .collect(),
        ),
        Agg::Sum | Agg::Min | Agg::Max | Agg::First | Agg::Last => {
            let mut b = Builder::new(name, m.input_type(), n);
            for (_, st) in states {
                let v = match st {
                    State::SumInt { sum, n } if *n > 0 => Some(Value::Int(*sum)),
                    State::SumFloat { sum, n } if *n > 0 => Some(Value::Float(*sum)),
                    State::Min(v) | State::Max(v) => v.clone(),
                    State::First(p) | State::Last(p) => p.as_ref().map(|p| p.1.clone()),
                    _ => None,
                };
                b.push(v.as_ref());
            }
            b.finish()
        }
    }
}
