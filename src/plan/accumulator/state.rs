//! One metric's mergeable state in one group, by aggregate: how two merge, and the finished
//! value.

use polars::prelude::*;

use crate::plan::hll::Registers;
use crate::plan::layout::{Agg, MetricLayout};
use crate::plan::quantile::Histogram;
use crate::plan::value::{Builder, Value};

#[derive(Debug, Clone)]
pub(super) enum State {
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
    pub(super) fn merge(&mut self, other: State) {
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

/// One metric's finished column from `(group rows, state)` pairs.
pub(super) fn finish_column<'a>(
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
