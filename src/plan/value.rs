//! One cell of a group key or of a min/max/first/last state, with the equality and order the
//! merge needs, plus typed reading from and writing to polars columns.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use polars::prelude::*;

use crate::spec::ColumnType;
use crate::spec::expr::dtype;

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    /// Ints and timestamps (epoch milliseconds); the column type tells them apart.
    Int(i64),
    Float(f64),
    Str(Box<str>),
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Bool(_) => 0,
            Value::Int(_) => 1,
            Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Null => 4,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// Polars groups -0.0 with 0.0 and every NaN together; so do we.
fn canonical_bits(f: f64) -> u64 {
    if f.is_nan() {
        f64::NAN.to_bits()
    } else if f == 0.0 {
        0
    } else {
        f.to_bits()
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Bool(b) => state.write_u8(1 + *b as u8),
            Value::Int(i) => state.write_i64(*i),
            Value::Float(f) => state.write_u64(canonical_bits(*f)),
            Value::Str(s) => s.hash(state),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Total order: values of one column compare naturally (strings bytewise, as polars does),
/// and null sorts last, as `ORDER BY … ASC` does in PostgreSQL.
impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => {
                f64::from_bits(canonical_bits(*a)).total_cmp(&f64::from_bits(canonical_bits(*b)))
            }
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// Typed random access to one column of a frame being merged.
pub(crate) enum Reader<'a> {
    Bool(&'a BooleanChunked),
    Int(&'a Int64Chunked),
    Float(&'a Float64Chunked),
    Str(&'a StringChunked),
}

impl<'a> Reader<'a> {
    /// `series` must already have the canonical dtype of `t` (checked by the caller).
    pub fn new(series: &'a Series, t: ColumnType) -> PolarsResult<Reader<'a>> {
        Ok(match t {
            ColumnType::Bool => Reader::Bool(series.bool()?),
            ColumnType::Int => Reader::Int(series.i64()?),
            ColumnType::Timestamp => Reader::Int(series.datetime()?.physical()),
            ColumnType::Float => Reader::Float(series.f64()?),
            ColumnType::String => Reader::Str(series.str()?),
        })
    }

    pub fn get(&self, i: usize) -> Value {
        let v = match self {
            Reader::Bool(c) => c.get(i).map(Value::Bool),
            Reader::Int(c) => c.get(i).map(Value::Int),
            Reader::Float(c) => c.get(i).map(Value::Float),
            Reader::Str(c) => c.get(i).map(|s| Value::Str(s.into())),
        };
        v.unwrap_or(Value::Null)
    }
}

/// Builds one output column of type `t` from values.
pub(crate) struct Builder {
    name: PlSmallStr,
    t: ColumnType,
    bools: Vec<Option<bool>>,
    ints: Vec<Option<i64>>,
    floats: Vec<Option<f64>>,
    strs: Vec<Option<Box<str>>>,
}

impl Builder {
    pub fn new(name: &str, t: ColumnType, capacity: usize) -> Builder {
        let cap = |want: bool| if want { capacity } else { 0 };
        Builder {
            name: name.into(),
            t,
            bools: Vec::with_capacity(cap(t == ColumnType::Bool)),
            ints: Vec::with_capacity(cap(matches!(t, ColumnType::Int | ColumnType::Timestamp))),
            floats: Vec::with_capacity(cap(t == ColumnType::Float)),
            strs: Vec::with_capacity(cap(t == ColumnType::String)),
        }
    }

    /// A value of another type than the column's is written as null; the merge never mixes.
    pub fn push(&mut self, v: Option<&Value>) {
        match self.t {
            ColumnType::Bool => self.bools.push(match v {
                Some(Value::Bool(b)) => Some(*b),
                _ => None,
            }),
            ColumnType::Int | ColumnType::Timestamp => self.ints.push(match v {
                Some(Value::Int(i)) => Some(*i),
                _ => None,
            }),
            ColumnType::Float => self.floats.push(match v {
                Some(Value::Float(f)) => Some(*f),
                _ => None,
            }),
            ColumnType::String => self.strs.push(match v {
                Some(Value::Str(s)) => Some(s.clone()),
                _ => None,
            }),
        }
    }

    pub fn finish(self) -> Column {
        let series = match self.t {
            ColumnType::Bool => Series::new(self.name, self.bools),
            ColumnType::Int => Series::new(self.name, self.ints),
            ColumnType::Timestamp => {
                Int64Chunked::from_iter_options(self.name, self.ints.into_iter())
                    .into_datetime(TimeUnit::Milliseconds, None)
                    .into_series()
            }
            ColumnType::Float => Series::new(self.name, self.floats),
            ColumnType::String => {
                StringChunked::from_iter_options(self.name, self.strs.iter().map(|s| s.as_deref()))
                    .into_series()
            }
        };
        debug_assert_eq!(series.dtype(), &dtype(self.t));
        series.into_column()
    }
}

/// A timestamp column from epoch milliseconds.
pub(crate) fn datetime_column(name: &str, values: Vec<Option<i64>>) -> Column {
    Int64Chunked::from_iter_options(name.into(), values.into_iter())
        .into_datetime(TimeUnit::Milliseconds, None)
        .into_series()
        .into_column()
}
