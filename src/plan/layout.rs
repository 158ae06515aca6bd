//! The shape of a view's partials and of its finished rows, decided once at compile time.
//!
//! Both halves of the plan read this: the polars partial aggregation ([`super::aggregate`])
//! writes columns by these names and types, and the in-memory merge
//! ([`super::accumulator`]) reads them back. Keeping the names in one place is what keeps
//! the two in step.

use polars::prelude::*;

use crate::spec::expr::dtype;
use crate::spec::{Aggregate, ColumnType, Pipeline, View, Window};

use super::PlanError;

/// Start of the window (tumbling) or of the session (first event time), in partials and output.
pub(crate) const WINDOW_START: &str = "window_start";
pub(crate) const WINDOW_END: &str = "window_end";
/// Hopping partials are kept per `every`-aligned pane; `finish` spreads each pane over the
/// `size / every` windows that contain it.
pub(crate) const PANE_START: &str = "pane_start";
/// Latest event time of a session; its window ends `gap` after it.
pub(crate) const SESSION_LAST: &str = "session_last";
/// Events in the group (before any metric skips nulls).
pub(crate) const ROWS: &str = "__rows";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowLayout {
    Tumbling { size: i64 },
    Hopping { size: i64, every: i64 },
    Session { gap: i64 },
    All,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Agg {
    Count,
    CountCol,
    Sum,
    Avg,
    Min,
    Max,
    Variance,
    Stddev,
    First,
    Last,
    Distinct,
    Quantile(f64),
}

#[derive(Debug, Clone)]
pub(crate) struct MetricLayout {
    pub name: String,
    pub agg: Agg,
    /// Input column and its type; `None` only for `count()`.
    pub input: Option<(String, ColumnType)>,
}

/// One state column of a metric's partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateCol {
    /// Non-null inputs seen.
    N,
    Sum,
    Min,
    Max,
    Mean,
    /// Sum of squared deviations from `Mean` (Welford/Chan form, stable under merge).
    M2,
    /// Event time of the picked first/last value.
    T,
    /// The picked first/last value.
    V,
    /// HyperLogLog registers, sparse: `register << 8 | rank`, one entry per register.
    Hll,
    /// Log-bucket quantile sketch: bucket codes and their counts, aligned lists.
    DdBucket,
    DdCount,
}

impl StateCol {
    fn suffix(self) -> &'static str {
        match self {
            StateCol::N => "n",
            StateCol::Sum => "sum",
            StateCol::Min => "min",
            StateCol::Max => "max",
            StateCol::Mean => "mean",
            StateCol::M2 => "m2",
            StateCol::T => "t",
            StateCol::V => "v",
            StateCol::Hll => "hll",
            StateCol::DdBucket => "dd_bucket",
            StateCol::DdCount => "dd_count",
        }
    }
}

impl MetricLayout {
    pub fn input_type(&self) -> ColumnType {
        self.input.as_ref().map_or(ColumnType::Int, |(_, t)| *t)
    }

    pub fn input_name(&self) -> &str {
        self.input.as_ref().map_or("", |(n, _)| n.as_str())
    }

    /// The metric's state columns, in partial-schema order.
    pub fn states(&self) -> &'static [StateCol] {
        use StateCol::*;
        match self.agg {
            Agg::Count => &[],
            Agg::CountCol => &[N],
            Agg::Sum | Agg::Avg => &[Sum, N],
            Agg::Min => &[Min],
            Agg::Max => &[Max],
            Agg::Variance | Agg::Stddev => &[N, Mean, M2],
            Agg::First | Agg::Last => &[T, V],
            Agg::Distinct => &[Hll],
            Agg::Quantile(_) => &[DdBucket, DdCount],
        }
    }

    pub fn state_name(&self, s: StateCol) -> String {
        format!("{}__{}", self.name, s.suffix())
    }

    pub fn state_dtype(&self, s: StateCol) -> DataType {
        let input = dtype(self.input_type());
        match s {
            StateCol::N => DataType::UInt64,
            StateCol::Sum | StateCol::Min | StateCol::Max | StateCol::V => input,
            StateCol::Mean | StateCol::M2 => DataType::Float64,
            StateCol::T => dtype(ColumnType::Timestamp),
            StateCol::Hll => DataType::List(Box::new(DataType::UInt32)),
            StateCol::DdBucket => DataType::List(Box::new(DataType::Int32)),
            StateCol::DdCount => DataType::List(Box::new(DataType::UInt64)),
        }
    }

    /// Type of the finished column.
    pub fn output_dtype(&self) -> DataType {
        match self.agg {
            Agg::Count | Agg::CountCol | Agg::Distinct => DataType::Int64,
            Agg::Sum | Agg::Min | Agg::Max | Agg::First | Agg::Last => dtype(self.input_type()),
            Agg::Avg | Agg::Variance | Agg::Stddev | Agg::Quantile(_) => DataType::Float64,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ViewLayout {
    pub view: String,
    pub event_time: String,
    pub window: WindowLayout,
    pub keys: Vec<(String, ColumnType)>,
    pub metrics: Vec<MetricLayout>,
}

impl ViewLayout {
    /// Checks the view against the prepared columns (schema + derived) and fixes its layout.
    pub fn build(
        pipeline: &Pipeline,
        view: &View,
        columns: &[(String, ColumnType)],
    ) -> Result<ViewLayout, PlanError> {
        let err = |reason: String| PlanError::View {
            pipeline: pipeline.name.clone(),
            view: view.name.clone(),
            reason,
        };
        let lookup = |c: &str| -> Result<(String, ColumnType), PlanError> {
            // The partial query names its helper columns `__…`.
            if c.starts_with("__") {
                return Err(err(format!(
                    "column `{c}`: names starting with `__` are reserved for the plan"
                )));
            }
            columns
                .iter()
                .find(|(n, _)| n == c)
                .cloned()
                .ok_or_else(|| err(format!("unknown column `{c}`")))
        };
        let window = match view.window {
            Window::Tumbling { size } => WindowLayout::Tumbling {
                size: millis(size).ok_or_else(|| err("window size must be at least 1ms".into()))?,
            },
            Window::Hopping { size, every } => {
                let (size, every) = millis(size)
                    .zip(millis(every))
                    .ok_or_else(|| err("hopping size and every must be at least 1ms".into()))?;
                if size % every != 0 {
                    return Err(err(format!(
                        "hopping size {size}ms is not a whole multiple of every {every}ms"
                    )));
                }
                WindowLayout::Hopping { size, every }
            }
            Window::Session { gap } => WindowLayout::Session {
                gap: millis(gap).ok_or_else(|| err("session gap must be at least 1ms".into()))?,
            },
            Window::All => WindowLayout::All,
        };
        let keys = view
            .group_by
            .iter()
            .map(|k| lookup(k))
            .collect::<Result<Vec<_>, _>>()?;
        let mut metrics = Vec::new();
        for m in &view.metrics {
            let agg = match &m.aggregate {
                Aggregate::Count => Agg::Count,
                Aggregate::CountCol(_) => Agg::CountCol,
                Aggregate::Sum(_) => Agg::Sum,
                Aggregate::Min(_) => Agg::Min,
                Aggregate::Max(_) => Agg::Max,
                Aggregate::Avg(_) => Agg::Avg,
                Aggregate::Stddev(_) => Agg::Stddev,
                Aggregate::Variance(_) => Agg::Variance,
                Aggregate::First(_) => Agg::First,
                Aggregate::Last(_) => Agg::Last,
                Aggregate::ApproxCountDistinct(_) => Agg::Distinct,
                Aggregate::ApproxQuantile(_, q) => Agg::Quantile(*q),
            };
            let input = m.aggregate.column().map(lookup).transpose()?;
            if let Some((c, t)) = &input {
                let numeric = t.is_numeric();
                let ok = match agg {
                    Agg::Sum | Agg::Avg | Agg::Variance | Agg::Stddev | Agg::Quantile(_) => numeric,
                    Agg::Min | Agg::Max => *t != ColumnType::Bool,
                    _ => true,
                };
                if !ok {
                    return Err(err(format!(
                        "metric `{}`: {} cannot aggregate `{c}`, a {} column",
                        m.name,
                        m.aggregate,
                        t.name()
                    )));
                }
            }
            if let Agg::Quantile(q) = agg
                && !(0.0..=1.0).contains(&q)
            {
                return Err(err(format!(
                    "metric `{}`: quantile {q} is not between 0 and 1",
                    m.name
                )));
            }
            metrics.push(MetricLayout {
                name: m.name.clone(),
                agg,
                input,
            });
        }
        let layout = ViewLayout {
            view: view.name.clone(),
            event_time: pipeline.event_time.clone(),
            window,
            keys,
            metrics,
        };
        for schema in [layout.partial_schema(), layout.output_schema()] {
            let mut seen = std::collections::HashSet::new();
            for (name, _) in schema.iter() {
                if !seen.insert(name.as_str()) {
                    return Err(err(format!(
                        "column name `{name}` is used twice in the view's output or partials \
                         (rename the group_by column or the metric)"
                    )));
                }
            }
        }
        Ok(layout)
    }

    /// Partial columns that identify the window (before the group keys).
    pub fn window_columns(&self) -> &'static [&'static str] {
        match self.window {
            WindowLayout::Tumbling { .. } => &[WINDOW_START],
            WindowLayout::Hopping { .. } => &[PANE_START],
            WindowLayout::Session { .. } => &[WINDOW_START, SESSION_LAST],
            WindowLayout::All => &[],
        }
    }

    /// Canonical partial schema: window columns, keys, `__rows`, then every metric's states.
    pub fn partial_schema(&self) -> Schema {
        let ts = dtype(ColumnType::Timestamp);
        let mut fields: Vec<Field> = self
            .window_columns()
            .iter()
            .map(|c| Field::new((*c).into(), ts.clone()))
            .collect();
        fields.extend(
            self.keys
                .iter()
                .map(|(k, t)| Field::new(k.as_str().into(), dtype(*t))),
        );
        fields.push(Field::new(ROWS.into(), DataType::UInt64));
        for m in &self.metrics {
            for s in m.states() {
                fields.push(Field::new(m.state_name(*s).into(), m.state_dtype(*s)));
            }
        }
        fields.into_iter().collect()
    }

    /// Finished rows: window_start, window_end, keys, metrics in declared order.
    pub fn output_schema(&self) -> Schema {
        let ts = dtype(ColumnType::Timestamp);
        let mut fields = vec![
            Field::new(WINDOW_START.into(), ts.clone()),
            Field::new(WINDOW_END.into(), ts),
        ];
        fields.extend(
            self.keys
                .iter()
                .map(|(k, t)| Field::new(k.as_str().into(), dtype(*t))),
        );
        fields.extend(
            self.metrics
                .iter()
                .map(|m| Field::new(m.name.as_str().into(), m.output_dtype())),
        );
        fields.into_iter().collect()
    }

    /// The text the logic hash is taken over: everything that decides this view's answer.
    pub fn describe(&self) -> String {
        let window = match self.window {
            WindowLayout::Tumbling { size } => format!("tumbling {size}ms"),
            WindowLayout::Hopping { size, every } => format!("hopping {size}ms every {every}ms"),
            WindowLayout::Session { gap } => format!("session gap {gap}ms"),
            WindowLayout::All => "all".to_string(),
        };
        let mut out = format!("window: {window}\nevent_time: {}\n", self.event_time);
        for (k, t) in &self.keys {
            out.push_str(&format!("group_by: {k} {}\n", t.name()));
        }
        for m in &self.metrics {
            out.push_str(&format!(
                "metric: {} = {:?}({}: {})\n",
                m.name,
                m.agg,
                m.input_name(),
                m.input.as_ref().map_or("", |(_, t)| t.name())
            ));
        }
        out
    }
}

/// Whole milliseconds, when at least one.
fn millis(d: std::time::Duration) -> Option<i64> {
    i64::try_from(d.as_millis()).ok().filter(|ms| *ms >= 1)
}
