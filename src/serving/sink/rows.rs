//! A served answer as a sink sees it: typed cells, rows keyed by (window_start, group keys),
//! and the difference between what a sink holds and what it should hold.
//!
//! Values compare exactly (floats by their bits): a sink is equal to the served answer, not
//! close to it. Floats that are not finite are null, as the HTTP API serves them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use polars::prelude::*;
use serde_json::Value;

use crate::clock::format_ms;
use crate::spec::{Emit, View};

/// One value of a row.
#[derive(Debug, Clone)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    /// Always finite.
    Float(f64),
    Text(String),
    /// A UTC instant, epoch milliseconds (the resolution of every time in a view).
    Time(i64),
}

impl Cell {
    /// A float cell; NaN and infinities are null.
    pub fn float(f: f64) -> Cell {
        if f.is_finite() {
            Cell::Float(f)
        } else {
            Cell::Null
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Cell::Null => 0,
            Cell::Bool(_) => 1,
            Cell::Int(_) => 2,
            Cell::Float(_) => 3,
            Cell::Text(_) => 4,
            Cell::Time(_) => 5,
        }
    }

    /// The cell as the HTTP API writes it: times as RFC 3339 strings.
    pub fn json(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Bool(b) => Value::Bool(*b),
            Cell::Int(i) => Value::from(*i),
            Cell::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Cell::Text(s) => Value::String(s.clone()),
            Cell::Time(ms) => Value::String(format_ms(*ms)),
        }
    }

    /// Reads a cell of `kind` back from the JSON [`Cell::json`] wrote; `None` when it is not
    /// one.
    pub fn from_json(kind: Kind, v: &Value) -> Option<Cell> {
        if v.is_null() {
            return Some(Cell::Null);
        }
        Some(match kind {
            Kind::Bool => Cell::Bool(v.as_bool()?),
            Kind::Int => Cell::Int(v.as_i64()?),
            Kind::Float => Cell::float(v.as_f64()?),
            Kind::Text => Cell::Text(v.as_str()?.to_string()),
            Kind::Time => Cell::Time(
                chrono::DateTime::parse_from_rfc3339(v.as_str()?)
                    .ok()?
                    .timestamp_millis(),
            ),
        })
    }
}

impl Cell {
    /// Reads a cell of `kind` from the JSON text of one value, as [`Cell::json`] wrote it:
    /// numbers from their text, exactly (serde_json's own float parsing may be off by one unit
    /// in the last place, which would make an unchanged row look changed). `None` when the
    /// text is not such a value.
    pub fn from_json_text(kind: Kind, text: &str) -> Option<Cell> {
        let text = text.trim();
        if text == "null" {
            return Some(Cell::Null);
        }
        match kind {
            Kind::Float => Some(Cell::float(text.parse().ok()?)),
            Kind::Int => Some(Cell::Int(text.parse().ok()?)),
            _ => Cell::from_json(kind, &serde_json::from_str(text).ok()?),
        }
    }
}

impl PartialEq for Cell {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Cell {}

impl PartialOrd for Cell {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cell {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Cell::Bool(a), Cell::Bool(b)) => a.cmp(b),
            (Cell::Int(a), Cell::Int(b)) => a.cmp(b),
            (Cell::Float(a), Cell::Float(b)) => a.total_cmp(b),
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Time(a), Cell::Time(b)) => a.cmp(b),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

/// What a column holds, as sinks type it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Text,
    Time,
}

impl Kind {
    pub fn of(dtype: &DataType) -> Kind {
        match dtype {
            DataType::Boolean => Kind::Bool,
            DataType::Float32 | DataType::Float64 => Kind::Float,
            DataType::Datetime(_, _) => Kind::Time,
            d if d.is_integer() => Kind::Int,
            _ => Kind::Text,
        }
    }
}

/// A view's served columns as a sink writes them, and which of them identify a row.
#[derive(Debug, Clone)]
pub struct Shape {
    /// In served order: window_start, window_end, the group keys, the metrics.
    pub columns: Vec<(String, Kind)>,
    /// Positions in `columns` of the row's identity: window_start and the group keys.
    pub key: Vec<usize>,
    /// The all-time window: window_start and window_end are always null.
    pub all_time: bool,
}

/// Position of `window_end` in a row.
pub const WINDOW_END: usize = 1;

impl Shape {
    /// The shape of `view`, whose served schema is `schema` (the plan's output schema).
    pub fn new(view: &View, schema: &Schema) -> Shape {
        let columns = schema
            .iter()
            .map(|(name, dtype)| (name.to_string(), Kind::of(dtype)))
            .collect();
        let mut key = vec![0];
        key.extend(2..2 + view.group_by.len());
        Shape {
            columns,
            key,
            all_time: view.window == crate::spec::Window::All,
        }
    }

    /// The identity of `row`.
    pub fn key_of(&self, row: &[Cell]) -> Vec<Cell> {
        self.key.iter().map(|&i| row[i].clone()).collect()
    }

    /// The names of the key columns, in key order.
    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.key.iter().map(|&i| self.columns[i].0.as_str())
    }
}

/// Rows by identity; each value is the whole row, in [`Shape::columns`] order. Ordered like
/// the API's answer: by window_start, then the group keys.
pub type Rows = BTreeMap<Vec<Cell>, Vec<Cell>>;

/// The rows of a finished answer `df` (in the view's served schema).
pub fn from_frame(df: &DataFrame, shape: &Shape) -> PolarsResult<Rows> {
    let n = df.height();
    let mut columns: Vec<Vec<Cell>> = Vec::with_capacity(shape.columns.len());
    for (name, kind) in &shape.columns {
        let c = df.column(name)?;
        let cells: Vec<Cell> = match kind {
            Kind::Bool => c
                .bool()?
                .iter()
                .map(|v| v.map_or(Cell::Null, Cell::Bool))
                .collect(),
            Kind::Int => c
                .cast(&DataType::Int64)?
                .i64()?
                .iter()
                .map(|v| v.map_or(Cell::Null, Cell::Int))
                .collect(),
            Kind::Float => c
                .cast(&DataType::Float64)?
                .f64()?
                .iter()
                .map(|v| v.map_or(Cell::Null, Cell::float))
                .collect(),
            Kind::Text => c
                .cast(&DataType::String)?
                .str()?
                .iter()
                .map(|v| v.map_or(Cell::Null, |s| Cell::Text(s.to_string())))
                .collect(),
            Kind::Time => c
                .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?
                .cast(&DataType::Int64)?
                .i64()?
                .iter()
                .map(|v| v.map_or(Cell::Null, Cell::Time))
                .collect(),
        };
        columns.push(cells);
    }
    let mut iters: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
    let mut rows = Rows::new();
    for _ in 0..n {
        let row: Vec<Cell> = iters
            .iter_mut()
            .map(|c| c.next().unwrap_or(Cell::Null))
            .collect();
        rows.insert(shape.key_of(&row), row);
    }
    Ok(rows)
}

/// `rows` as a frame in the served schema (timestamps as UTC milliseconds), in key order.
pub fn to_frame<'a>(
    shape: &Shape,
    rows: impl Iterator<Item = &'a Vec<Cell>> + Clone,
) -> PolarsResult<DataFrame> {
    let mut columns = Vec::with_capacity(shape.columns.len());
    for (i, (name, kind)) in shape.columns.iter().enumerate() {
        let cells = rows.clone().map(|r| &r[i]);
        let name = PlSmallStr::from(name.as_str());
        let series = match kind {
            Kind::Bool => Series::new(
                name,
                cells
                    .map(|c| match c {
                        Cell::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Int => Series::new(
                name,
                cells
                    .map(|c| match c {
                        Cell::Int(v) => Some(*v),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Float => Series::new(
                name,
                cells
                    .map(|c| match c {
                        Cell::Float(v) => Some(*v),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Text => Series::new(
                name,
                cells
                    .map(|c| match c {
                        Cell::Text(s) => Some(s.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Time => Series::new(
                name,
                cells
                    .map(|c| match c {
                        Cell::Time(ms) => Some(*ms),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?,
        };
        columns.push(series.into());
    }
    let height = rows.count();
    DataFrame::new(height, columns)
}

/// The rows a sink should hold, out of the whole answer `answer`: with `emit: updates` all of
/// them; with `emit: final` those whose window ended `lateness_ms` or more before `now_ms`,
/// and those the sink already holds (a later change of a written window is written too).
pub fn due(answer: Rows, held: &Rows, emit: Emit, lateness_ms: i64, now_ms: i64) -> Rows {
    match emit {
        Emit::Updates => answer,
        Emit::Final => {
            let mut answer = answer;
            answer.retain(|key, row| {
                held.contains_key(key)
                    || matches!(row.get(WINDOW_END), Some(Cell::Time(end)) if end.saturating_add(lateness_ms) <= now_ms)
            });
            answer
        }
    }
}

/// What turns a sink holding one set of rows into one holding another.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// Whole rows that are new or whose values changed, in key order.
    pub upserts: Vec<Vec<Cell>>,
    /// Keys of rows that are gone, in key order.
    pub deletes: Vec<Vec<Cell>>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// The changes from `held` to `want`: one pass over both, in key order.
pub fn diff(held: &Rows, want: &Rows) -> Diff {
    let mut out = Diff::default();
    let mut a = held.iter().peekable();
    let mut b = want.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.deletes.push((*k).clone());
                a.next();
            }
            (None, Some((_, row))) => {
                out.upserts.push((*row).clone());
                b.next();
            }
            (Some((ka, ra)), Some((kb, rb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.deletes.push((*ka).clone());
                    a.next();
                }
                Ordering::Greater => {
                    out.upserts.push((*rb).clone());
                    b.next();
                }
                Ordering::Equal => {
                    if ra != rb {
                        out.upserts.push((*rb).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

/// `held` with `diff` applied: what a sink holds after a delivery of it.
pub fn apply(held: &mut Rows, diff: &Diff, shape: &Shape) {
    for k in &diff.deletes {
        held.remove(k);
    }
    for row in &diff.upserts {
        held.insert(shape.key_of(row), row.clone());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::spec::{Aggregate, Metric, Window};

    fn shape() -> Shape {
        Shape {
            columns: vec![
                ("window_start".into(), Kind::Time),
                ("window_end".into(), Kind::Time),
                ("page".into(), Kind::Text),
                ("views".into(), Kind::Int),
                ("avg".into(), Kind::Float),
            ],
            key: vec![0, 2],
            all_time: false,
        }
    }

    fn row(start: i64, page: Option<&str>, views: i64, avg: f64) -> Vec<Cell> {
        vec![
            Cell::Time(start),
            Cell::Time(start + 60_000),
            page.map_or(Cell::Null, |p| Cell::Text(p.into())),
            Cell::Int(views),
            Cell::float(avg),
        ]
    }

    fn rows(list: &[Vec<Cell>]) -> Rows {
        let s = shape();
        list.iter().map(|r| (s.key_of(r), r.clone())).collect()
    }

    #[test]
    fn diff_upserts_changed_and_new_rows_and_deletes_vanished_ones() {
        let held = rows(&[
            row(0, Some("/a"), 1, 1.0),
            row(0, Some("/b"), 2, 2.0),
            row(60_000, None, 3, 3.0),
        ]);
        let want = rows(&[
            row(0, Some("/a"), 1, 1.0),       // same: nothing
            row(60_000, None, 4, 3.0),        // changed: upsert
            row(120_000, Some("/c"), 1, 0.5), // new: upsert
        ]);
        let d = diff(&held, &want);
        assert_eq!(
            d.upserts,
            vec![row(60_000, None, 4, 3.0), row(120_000, Some("/c"), 1, 0.5)]
        );
        assert_eq!(
            d.deletes,
            vec![vec![Cell::Time(0), Cell::Text("/b".into())]]
        );
        assert!(diff(&want, &want).is_empty());
    }

    #[test]
    fn floats_compare_exactly_and_non_finite_ones_are_null() {
        let a = rows(&[row(0, Some("/a"), 1, 0.1 + 0.2)]);
        let b = rows(&[row(0, Some("/a"), 1, 0.3)]);
        assert_eq!(diff(&a, &b).upserts.len(), 1, "0.1 + 0.2 is not 0.3");
        assert_eq!(Cell::float(f64::NAN), Cell::Null);
        assert_eq!(Cell::float(f64::INFINITY).json(), Value::Null);
    }

    #[test]
    fn final_emission_waits_for_the_window_end_plus_lateness_then_follows_changes() {
        let answer = rows(&[row(0, Some("/a"), 1, 1.0), row(60_000, Some("/a"), 1, 1.0)]);
        // At 130 s with 10 s lateness: the first window (ended at 60 s) is due, the second
        // (ends at 120 s, final at 130 s) just so; at 129 s it is not.
        let due_at = |now| due(answer.clone(), &Rows::new(), Emit::Final, 10_000, now);
        assert_eq!(due_at(129_999).len(), 1);
        assert_eq!(due_at(130_000).len(), 2);
        // A window the sink holds is followed even before it is final again (a late event
        // or a batch publication changed it).
        let held = rows(&[row(60_000, Some("/a"), 1, 1.0)]);
        let changed = rows(&[row(60_000, Some("/a"), 2, 1.0)]);
        let want = due(changed, &held, Emit::Final, 10_000, 61_000);
        assert_eq!(
            diff(&held, &want).upserts,
            vec![row(60_000, Some("/a"), 2, 1.0)]
        );
        assert_eq!(
            due(answer.clone(), &Rows::new(), Emit::Updates, 0, 0),
            answer
        );
    }

    #[test]
    fn cells_survive_their_json_form() {
        for (kind, cell) in [
            (Kind::Time, Cell::Time(1_763_719_200_123)),
            (Kind::Float, Cell::Float(0.1 + 0.2)),
            (Kind::Float, Cell::Float(-0.0)),
            (Kind::Int, Cell::Int(i64::MIN)),
            (Kind::Text, Cell::Text("/a \"b\"".into())),
            (Kind::Bool, Cell::Bool(false)),
            (Kind::Text, Cell::Null),
        ] {
            let back = Cell::from_json(kind, &cell.json());
            assert_eq!(back, Some(cell.clone()), "{cell:?}");
        }
        assert_eq!(Cell::from_json(Kind::Int, &Value::from("x")), None);
    }

    #[test]
    fn numbers_read_back_from_their_text_exactly() {
        for f in [
            384.46500000000003,
            0.1 + 0.2,
            1e300,
            -0.0,
            5e-324,
            2003.6599999999999,
        ] {
            let text = Cell::Float(f).json().to_string();
            assert_eq!(
                Cell::from_json_text(Kind::Float, &text),
                Some(Cell::Float(f)),
                "{text}"
            );
        }
        assert_eq!(
            Cell::from_json_text(Kind::Int, "-9223372036854775808"),
            Some(Cell::Int(i64::MIN))
        );
        assert_eq!(
            Cell::from_json_text(Kind::Time, "\"2025-11-21T10:00:00.000Z\""),
            Some(Cell::Time(1_763_719_200_000))
        );
        assert_eq!(Cell::from_json_text(Kind::Text, " null"), Some(Cell::Null));
        assert_eq!(Cell::from_json_text(Kind::Float, "\"1\""), None);
    }

    #[test]
    fn frames_convert_both_ways_keyed_by_window_and_group() {
        let view = View {
            name: "v".into(),
            group_by: vec!["page".into()],
            window: Window::Tumbling {
                size: std::time::Duration::from_secs(60),
            },
            metrics: vec![Metric {
                name: "views".into(),
                aggregate: Aggregate::Count,
            }],
            sinks: Vec::new(),
        };
        let s = shape();
        let want = rows(&[
            row(60_000, Some("/b"), 2, 2.5),
            row(0, None, 1, f64::NAN),
            row(0, Some("/a"), 3, 1.0),
        ]);
        let df = to_frame(&s, want.values()).unwrap();
        assert_eq!(df.height(), 3);
        assert_eq!(Shape::new(&view, df.schema()).key, vec![0, 2]);
        assert_eq!(from_frame(&df, &s).unwrap(), want);
        // Keys order like the API: window first, a null group before the others.
        let keys: Vec<&Vec<Cell>> = want.keys().collect();
        assert_eq!(keys[0], &vec![Cell::Time(0), Cell::Null]);
        assert_eq!(keys[2][0], Cell::Time(60_000));
    }

    fn any_rows() -> impl Strategy<Value = Rows> {
        proptest::collection::vec((0..4i64, proptest::option::of(0..3u8), 0..3i64), 0..12).prop_map(
            |list| {
                let list: Vec<Vec<Cell>> = list
                    .into_iter()
                    .map(|(w, p, v)| row(w * 60_000, p.map(|p| format!("/{p}")).as_deref(), v, 1.0))
                    .collect();
                rows(&list)
            },
        )
    }

    proptest! {
        /// Applying the diff to what a sink holds gives exactly what it should hold, and the
        /// diff touches only keys that differ.
        #[test]
        fn applying_the_diff_converges(held in any_rows(), want in any_rows()) {
            let d = diff(&held, &want);
            let mut after = held.clone();
            apply(&mut after, &d, &shape());
            prop_assert_eq!(&after, &want);
            for r in &d.upserts {
                let k = shape().key_of(r);
                prop_assert!(held.get(&k) != Some(r));
            }
            for k in &d.deletes {
                prop_assert!(!want.contains_key(k));
            }
        }
    }
}
