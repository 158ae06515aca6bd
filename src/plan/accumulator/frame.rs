//! The canonical partial frame's columns (format v1) as the accumulator reads and writes them:
//! typed views of a frame's columns, a metric's state read from its state columns at a row,
//! and the state columns and key columns written from groups.

use polars::prelude::*;

use super::Row;
use super::state::State;
use crate::plan::hll::Registers;
use crate::plan::layout::{Agg, MetricLayout, StateCol, ViewLayout};
use crate::plan::quantile::Histogram;
use crate::plan::value::{Builder, Reader, Value, datetime_column};
use crate::spec::ColumnType;

/// Typed views of one partial frame's columns.
pub(super) struct Columns<'a> {
    pub(super) window: Vec<&'a Int64Chunked>,
    pub(super) keys: Vec<Reader<'a>>,
    pub(super) rows: &'a UInt64Chunked,
    /// Per metric, per state column.
    pub(super) states: Vec<Vec<StateColumn<'a>>>,
}

pub(super) enum StateColumn<'a> {
    U64(&'a UInt64Chunked),
    F64(&'a Float64Chunked),
    Time(&'a Int64Chunked),
    Value(Reader<'a>),
    List(&'a ListChunked),
}

pub(super) fn key_columns(layout: &ViewLayout, rows: &[Row]) -> Vec<Column> {
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

pub(super) fn columns<'a>(layout: &ViewLayout, series: &'a [Series]) -> PolarsResult<Columns<'a>> {
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

pub(super) fn read_state(m: &MetricLayout, c: &[StateColumn], r: usize) -> PolarsResult<State> {
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
pub(super) fn state_column<'a>(
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
