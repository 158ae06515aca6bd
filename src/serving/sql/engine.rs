//! Running a statement: each view it names is its current answer (the same snapshot and row
//! index the HTTP API uses), each catalog table its frame; polars SQL runs the rewritten
//! statement over them. Blocking: callers run it on the blocking pool, under the statement
//! timeout.

use std::collections::BTreeMap;
use std::sync::Arc;

use polars::prelude::*;
use polars::sql::SQLContext;
use sqlparser::ast::{
    BinaryOperator, DataType as SqlType, Expr, SetExpr, Statement, TableFactor, TypedString, Value,
    ValueWithSpan,
};

use super::SqlError;
use super::catalog::{Catalog, Columns};
use super::statement::{Source, TableRef, parse_naive};
use super::types::pg_type;
use crate::serving::query::{QueryError, Served, ViewQuery};
use crate::spec::{ColumnType, SqlSettings, Window};
use crate::speed::runtime::PipelineRuntime;

pub struct Engine {
    pub served: BTreeMap<String, Arc<Served>>,
    pub catalog: Catalog,
    pub settings: SqlSettings,
    /// `serve.token`: the password every user must give, when set.
    pub token: Option<String>,
}

impl Engine {
    pub fn new(
        served: BTreeMap<String, Arc<Served>>,
        settings: SqlSettings,
        token: Option<String>,
    ) -> Engine {
        let views = served
            .iter()
            .map(|(name, s)| {
                let rt = &s.runtime;
                let list: Vec<(String, Columns)> = rt
                    .pipeline
                    .views
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let schema = rt.plan.output_schema(i);
                        let columns = schema
                            .iter()
                            .map(|(c, dt)| (c.to_string(), pg_type(dt)))
                            .collect::<Columns>();
                        (v.name.clone(), columns)
                    })
                    .collect();
                (name.clone(), list)
            })
            .collect();
        Engine {
            served,
            catalog: Catalog::new(views, "lambda"),
            settings,
            token,
        }
    }

    fn served(&self, pipeline: &str) -> Result<&Arc<Served>, SqlError> {
        self.served
            .get(pipeline)
            .ok_or_else(|| SqlError::new("42P01", format!("schema \"{pipeline}\" does not exist")))
    }

    /// The frames of `tables`: with `data`, the views' current answers (narrowed by the
    /// statement's filters on group keys and window starts, through the row index);
    /// without, empty frames of their schemas (to describe a statement).
    fn context(
        &self,
        statement: &Statement,
        tables: &[TableRef],
        data: bool,
    ) -> Result<SQLContext, SqlError> {
        let ctx = SQLContext::new();
        for t in tables {
            let frame = match &t.source {
                Source::View { pipeline, view } => {
                    let served = self.served(pipeline)?;
                    let rt = &served.runtime;
                    if data {
                        let q = if tables.len() == 1 {
                            narrowing(statement, rt, *view)
                        } else {
                            ViewQuery::default()
                        };
                        match served.frame(*view, &q) {
                            Ok((df, _as_of)) => df,
                            Err(QueryError::BadRequest(m)) => {
                                return Err(SqlError::new("XX000", m));
                            }
                            Err(QueryError::Internal(e)) => {
                                return Err(SqlError::new(
                                    "XX000",
                                    format!("computing the view failed: {e}"),
                                ));
                            }
                        }
                    } else {
                        DataFrame::empty_with_schema(&rt.plan.output_schema(*view))
                    }
                }
                Source::Catalog(name) => self.catalog.frame(name).ok_or_else(|| {
                    SqlError::new("42P01", format!("relation \"{name}\" does not exist"))
                })?,
            };
            ctx.register(&t.registered, frame.lazy());
        }
        Ok(ctx)
    }

    /// Runs `statement` (rewritten, parameters bound). `sql` is the client's text, for the
    /// positions of errors.
    pub fn run(
        &self,
        statement: &Statement,
        tables: &[TableRef],
        sql: &str,
    ) -> Result<DataFrame, SqlError> {
        let mut ctx = self.context(statement, tables, true)?;
        let lf = ctx
            .execute(&statement.to_string())
            .map_err(|e| polars_error(e, sql))?;
        let max = self.settings.max_rows;
        let limit = IdxSize::try_from(max.saturating_add(1)).unwrap_or(IdxSize::MAX);
        let df = lf
            .limit(limit)
            .collect()
            .map_err(|e| polars_error(e, sql))?;
        if df.height() > max {
            return Err(SqlError::new(
                "54000",
                format!(
                    "the result has more than {max} rows (serve.sql.max_rows); add a WHERE, an aggregate or a LIMIT"
                ),
            ));
        }
        Ok(df)
    }

    /// The result columns of `statement` without running it over data.
    pub fn describe(
        &self,
        statement: &Statement,
        tables: &[TableRef],
        sql: &str,
    ) -> Result<SchemaRef, SqlError> {
        let mut ctx = self.context(statement, tables, false)?;
        let mut lf = ctx
            .execute(&statement.to_string())
            .map_err(|e| polars_error(e, sql))?;
        lf.collect_schema().map_err(|e| polars_error(e, sql))
    }
}

/// A polars error as an SQL error: a missing column is 42703, an unknown function 42883, a
/// syntax problem 42601; the position is where the name it quotes first appears in `sql`.
fn polars_error(e: PolarsError, sql: &str) -> SqlError {
    // The first line: polars follows it with the plan it resolved, which says nothing to a
    // SQL client.
    let full = e.to_string();
    let message = full.lines().next().unwrap_or_default().trim().to_string();
    let code = match &e {
        PolarsError::ColumnNotFound(_) => "42703",
        PolarsError::SQLSyntax(_) => "42601",
        PolarsError::SQLInterface(_) if message.contains("unsupported function") => "42883",
        PolarsError::SQLInterface(_) if message.contains("not found") => "42P01",
        PolarsError::SQLInterface(_) => "0A000",
        PolarsError::InvalidOperation(_) | PolarsError::SchemaMismatch(_) => "42804",
        PolarsError::ComputeError(_) => "22000",
        _ => "XX000",
    };
    let position = quoted_name(&message).and_then(|name| find_word(sql, &name));
    SqlError::new(code, message).at(position)
}

/// The first name quoted in a message (`"x"` or `'x'`).
fn quoted_name(message: &str) -> Option<String> {
    for q in ['"', '\''] {
        if let Some(start) = message.find(q) {
            let rest = &message[start + 1..];
            if let Some(end) = rest.find(q) {
                let name = &rest[..end];
                if !name.is_empty() {
                    return Some(name.to_string());
                }
            }
        }
    }
    None
}

/// The 1-based character position of `word` in `sql` as a whole word, ignoring case.
fn find_word(sql: &str, word: &str) -> Option<usize> {
    let lower = sql.to_lowercase();
    let w = word.to_lowercase();
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut from = 0;
    while let Some(i) = lower[from..].find(&w).map(|i| i + from) {
        let before = lower[..i].chars().next_back();
        let after = lower[i + w.len()..].chars().next();
        if !is_word(before) && !is_word(after) {
            return Some(lower[..i].chars().count() + 1);
        }
        from = i + w.len().max(1);
    }
    None
}

/// What of a one-table statement's WHERE the row index can answer: equality on group keys
/// and bounds on `window_start`, at the top level of an AND. The statement still applies its
/// whole WHERE; this only narrows the rows it runs over.
fn narrowing(statement: &Statement, rt: &PipelineRuntime, view: usize) -> ViewQuery {
    let mut q = ViewQuery::default();
    let Statement::Query(query) = statement else {
        return q;
    };
    // One table read once: a subquery reading the same view must see all of it.
    let mut reads = 0;
    let _ = sqlparser::ast::visit_relations(statement, |_| {
        reads += 1;
        std::ops::ControlFlow::<()>::Continue(())
    });
    if reads != 1 || query.with.is_some() {
        return q;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return q;
    };
    if select.from.len() != 1
        || !select.from[0].joins.is_empty()
        || !matches!(select.from[0].relation, TableFactor::Table { .. })
    {
        return q;
    }
    let Some(selection) = &select.selection else {
        return q;
    };
    let v = &rt.pipeline.views[view];
    let key_type = |name: &str| -> Option<ColumnType> {
        if !v.group_by.iter().any(|g| g == name) {
            return None;
        }
        crate::spec::expr::column_type(rt.plan.output_schema(view).get(name)?)
    };
    let windows = v.window != Window::All;
    let mut conjuncts = vec![selection];
    while let Some(e) = conjuncts.pop() {
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                conjuncts.push(left.as_ref());
                conjuncts.push(right.as_ref());
            }
            Expr::Nested(inner) => conjuncts.push(inner.as_ref()),
            Expr::BinaryOp { left, op, right } => {
                let (column, op, value) = match (column_name(left), column_name(right)) {
                    (Some(c), None) => (c, op.clone(), right.as_ref()),
                    (None, Some(c)) => (c, flipped(op), left.as_ref()),
                    _ => continue,
                };
                if column == "window_start"
                    && windows
                    && let Some(us) = timestamp_value(value)
                {
                    bound(&mut q, &op, us);
                } else if op == BinaryOperator::Eq
                    && let Some(t) = key_type(&column)
                    && let Some(text) = key_value(value, t)
                {
                    q.filters.push((column, text));
                }
            }
            Expr::Between {
                expr,
                negated: false,
                low,
                high,
            } if windows && column_name(expr).as_deref() == Some("window_start") => {
                if let (Some(lo), Some(hi)) = (timestamp_value(low), timestamp_value(high)) {
                    bound(&mut q, &BinaryOperator::GtEq, lo);
                    bound(&mut q, &BinaryOperator::LtEq, hi);
                }
            }
            _ => {}
        }
    }
    q
}

fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.clone()),
        Expr::CompoundIdentifier(ids) => ids.last().map(|i| i.value.clone()),
        _ => None,
    }
}

/// `a OP b` as `b OP' a`.
fn flipped(op: &BinaryOperator) -> BinaryOperator {
    match op {
        BinaryOperator::Lt => BinaryOperator::Gt,
        BinaryOperator::LtEq => BinaryOperator::GtEq,
        BinaryOperator::Gt => BinaryOperator::Lt,
        BinaryOperator::GtEq => BinaryOperator::LtEq,
        other => other.clone(),
    }
}

/// Epoch microseconds of a `TIMESTAMP '…'` literal (what the rewrite makes of times).
fn timestamp_value(e: &Expr) -> Option<i64> {
    match e {
        Expr::TypedString(TypedString {
            data_type: SqlType::Timestamp(_, _),
            value:
                ValueWithSpan {
                    value: Value::SingleQuotedString(s),
                    ..
                },
            ..
        }) => parse_naive(s),
        _ => None,
    }
}

/// Narrows `q`'s `[from, to)` (epoch ms, window starts being whole milliseconds) by
/// `window_start OP us`.
fn bound(q: &mut ViewQuery, op: &BinaryOperator, us: i64) {
    let floor = us.div_euclid(1000);
    let ceil = floor + i64::from(us.rem_euclid(1000) != 0);
    let (from, to) = match op {
        BinaryOperator::Eq => (Some(ceil), Some(floor + 1)),
        BinaryOperator::GtEq => (Some(ceil), None),
        BinaryOperator::Gt => (Some(floor + 1), None),
        BinaryOperator::Lt => (None, Some(ceil)),
        BinaryOperator::LtEq => (None, Some(floor + 1)),
        _ => (None, None),
    };
    if let Some(f) = from {
        q.from = Some(q.from.map_or(f, |x| x.max(f)));
    }
    if let Some(t) = to {
        q.to = Some(q.to.map_or(t, |x| x.min(t)));
    }
}

/// A literal compared with a group key, as the row index holds the key's values (the column
/// cast to text); `None` when the two forms could differ.
fn key_value(e: &Expr, t: ColumnType) -> Option<String> {
    let Expr::Value(ValueWithSpan { value, .. }) = e else {
        return None;
    };
    match (value, t) {
        (Value::SingleQuotedString(s), ColumnType::String) => Some(s.clone()),
        (Value::Number(n, _), ColumnType::Int) if n.parse::<i64>().is_ok() => {
            n.parse::<i64>().ok().map(|v| v.to_string())
        }
        (Value::Boolean(b), ColumnType::Bool) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_positions_point_at_the_quoted_name() {
        assert_eq!(find_word("SELECT nope FROM t", "nope"), Some(8));
        assert_eq!(find_word("SELECT pagex, page FROM t", "page"), Some(15));
        assert_eq!(
            quoted_name("unable to find column \"nope\"; valid columns: [\"a\"]"),
            Some("nope".into())
        );
    }

    #[test]
    fn window_bounds_become_whole_milliseconds() {
        let mut q = ViewQuery::default();
        bound(&mut q, &BinaryOperator::GtEq, 1_500);
        bound(&mut q, &BinaryOperator::LtEq, 9_000);
        assert_eq!((q.from, q.to), (Some(2), Some(10)));
        let mut q = ViewQuery::default();
        bound(&mut q, &BinaryOperator::Gt, 2_000);
        bound(&mut q, &BinaryOperator::Lt, 5_001);
        assert_eq!((q.from, q.to), (Some(3), Some(6)));
    }
}
