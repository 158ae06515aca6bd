//! Running a statement: each view it names is its current answer (the same snapshot and row
//! index the HTTP API uses), each catalog table its frame; polars SQL runs the rewritten
//! statement over them. Blocking: callers run it on the blocking pool, under the statement
//! timeout.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;
use polars::prelude::*;
use polars::sql::SQLContext;
use sqlparser::ast::{
    BinaryOperator, DataType as SqlType, Expr, GroupByExpr, Query, Select, SelectItem, SetExpr,
    Statement, TableFactor, TypedString, Value, ValueWithSpan, WildcardAdditionalOptions,
};

use super::SqlError;
use super::catalog::{Catalog, Columns};
use super::statement::{Source, TableRef, parse_naive};
use super::types::pg_type;
use crate::clock::Tick;
use crate::plan::Plan;
use crate::serving::query::{QueryError, Served, ViewQuery};
use crate::spec::{ColumnType, SqlSettings, View, Window};

pub struct Engine {
    pub served: BTreeMap<String, Arc<Served>>,
    /// The catalog of the definitions it was made from (a promote switches a pipeline's).
    catalog: RwLock<(Vec<Arc<Plan>>, Arc<Catalog>)>,
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
        let plans = plans(&served);
        let catalog = RwLock::new((plans.clone(), Arc::new(catalog(&plans))));
        Engine {
            served,
            catalog,
            settings,
            token,
        }
    }

    /// The catalog of the views as the pipelines define them now.
    pub fn catalog(&self) -> Arc<Catalog> {
        let now = plans(&self.served);
        {
            let (made, catalog) = &*self.catalog.read();
            if made.len() == now.len() && made.iter().zip(&now).all(|(a, b)| Arc::ptr_eq(a, b)) {
                return catalog.clone();
            }
        }
        let catalog = Arc::new(self::catalog(&now));
        *self.catalog.write() = (now, catalog.clone());
        catalog
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
        data: Option<Option<Tick>>,
    ) -> Result<SQLContext, SqlError> {
        let ctx = SQLContext::new();
        for t in tables {
            let frame = match &t.source {
                Source::View { pipeline, view } => {
                    let served = self.served(pipeline)?;
                    let plan = served.runtime.plan();
                    if let Some(as_of) = data {
                        let q = if tables.len() == 1 {
                            narrowing(
                                statement,
                                &plan.pipeline().views[*view],
                                &plan.output_schema(*view),
                            )
                            .query
                        } else {
                            ViewQuery::default()
                        };
                        view_frame(served, *view, &q, as_of)?
                    } else {
                        DataFrame::empty_with_schema(&plan.output_schema(*view))
                    }
                }
                Source::Catalog(name) => self.catalog().frame(name).ok_or_else(|| {
                    SqlError::new("42P01", format!("relation \"{name}\" does not exist"))
                })?,
            };
            ctx.register(&t.registered, frame.lazy());
        }
        Ok(ctx)
    }

    /// Runs `statement` (rewritten, parameters bound). `sql` is the client's text, for the
    /// positions of errors.
    /// `as_of`: the views as they were served at that instant (`SET lambda.as_of`).
    pub fn run(
        &self,
        statement: &Statement,
        tables: &[TableRef],
        sql: &str,
        as_of: Option<Tick>,
    ) -> Result<DataFrame, SqlError> {
        if let Some(df) = self.point(statement, tables, as_of)? {
            return self.within_max_rows(df);
        }
        let mut ctx = self.context(statement, tables, Some(as_of))?;
        let lf = ctx
            .execute(&statement.to_string())
            .map_err(|e| polars_error(e, sql))?;
        let limit =
            IdxSize::try_from(self.settings.max_rows.saturating_add(1)).unwrap_or(IdxSize::MAX);
        let df = lf
            .limit(limit)
            .collect()
            .map_err(|e| polars_error(e, sql))?;
        self.within_max_rows(df)
    }

    /// A point query answered by the row index alone: `SELECT columns FROM view WHERE …`
    /// whose WHERE is wholly equality on group keys and bounds on `window_start` (what
    /// dashboards and drivers send with a bound key). Polars SQL would plan the statement and
    /// filter rows the index already picked, to the same result; this skips it. `None` for
    /// any other statement.
    fn point(
        &self,
        statement: &Statement,
        tables: &[TableRef],
        as_of: Option<Tick>,
    ) -> Result<Option<DataFrame>, SqlError> {
        let [
            TableRef {
                source: Source::View { pipeline, view },
                ..
            },
        ] = tables
        else {
            return Ok(None);
        };
        let served = self.served(pipeline)?;
        let plan = served.runtime.plan();
        let schema = plan.output_schema(*view);
        let narrowed = narrowing(statement, &plan.pipeline().views[*view], &schema);
        if !narrowed.exact {
            return Ok(None);
        }
        let Some(columns) = projection(statement, &schema) else {
            return Ok(None);
        };
        let df = view_frame(served, *view, &narrowed.query, as_of)?;
        let columns = columns
            .into_iter()
            .map(|(name, output)| {
                df.column(&name)
                    .map(|c| c.clone().with_name(output.into()))
                    .map_err(|e| SqlError::new("XX000", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        DataFrame::new(df.height(), columns)
            .map(Some)
            .map_err(|e| SqlError::new("XX000", e.to_string()))
    }

    /// `df`, unless it has more rows than `serve.sql.max_rows` allows.
    fn within_max_rows(&self, df: DataFrame) -> Result<DataFrame, SqlError> {
        let max = self.settings.max_rows;
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
        let mut ctx = self.context(statement, tables, None)?;
        let mut lf = ctx
            .execute(&statement.to_string())
            .map_err(|e| polars_error(e, sql))?;
        lf.collect_schema().map_err(|e| polars_error(e, sql))
    }
}

/// The definitions the pipelines run now, in name order.
fn plans(served: &BTreeMap<String, Arc<Served>>) -> Vec<Arc<Plan>> {
    served.values().map(|s| s.runtime.plan()).collect()
}

/// The catalog of `plans`' views: a schema per pipeline, a table per view.
fn catalog(plans: &[Arc<Plan>]) -> Catalog {
    let views = plans
        .iter()
        .map(|plan| {
            let list: Vec<(String, Columns)> = plan
                .pipeline()
                .views
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let columns = plan
                        .output_schema(i)
                        .iter()
                        .map(|(c, dt)| (c.to_string(), pg_type(dt)))
                        .collect::<Columns>();
                    (v.name.clone(), columns)
                })
                .collect();
            (plan.pipeline().name.clone(), list)
        })
        .collect();
    Catalog::new(views, "lambda")
}

/// The rows of a view that `q` selects, under the snapshot and row index of the HTTP API; as
/// served at instant `as_of` when given.
fn view_frame(
    served: &Arc<Served>,
    view: usize,
    q: &ViewQuery,
    as_of: Option<Tick>,
) -> Result<DataFrame, SqlError> {
    let framed = match as_of {
        Some(at) => crate::serving::travel::frame_as_of(served, view, q, at),
        None => served.frame(view, q),
    };
    match framed {
        Ok((df, _as_of)) => Ok(df),
        Err(
            QueryError::BadRequest(m)
            | QueryError::Gone(m)
            | QueryError::NotFound(m)
            | QueryError::Conflict(m),
        ) => Err(SqlError::new("XX000", m)),
        Err(e @ (QueryError::Internal(_) | QueryError::Other(_))) => Err(SqlError::new(
            "XX000",
            format!("computing the view failed: {e}"),
        )),
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
/// and bounds on `window_start`, at the top level of an AND.
struct Narrowing {
    query: ViewQuery,
    /// The statement is a plain `SELECT … FROM view [WHERE …]` (no grouping, ordering, limit
    /// or distinct) whose whole WHERE is in `query`: the index's rows are its rows.
    exact: bool,
}

/// The [`Narrowing`] of `statement` over view `v` (its output `schema`). Unless it is exact,
/// the statement still applies its whole WHERE; the narrowing only cuts the rows it runs over.
fn narrowing(statement: &Statement, v: &View, schema: &Schema) -> Narrowing {
    let mut n = Narrowing {
        query: ViewQuery::default(),
        exact: false,
    };
    let Statement::Query(query) = statement else {
        return n;
    };
    // One table read once: a subquery reading the same view must see all of it.
    let mut reads = 0;
    let _ = sqlparser::ast::visit_relations(statement, |_| {
        reads += 1;
        std::ops::ControlFlow::<()>::Continue(())
    });
    if reads != 1 || query.with.is_some() {
        return n;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return n;
    };
    if select.from.len() != 1
        || !select.from[0].joins.is_empty()
        || !matches!(select.from[0].relation, TableFactor::Table { .. })
    {
        return n;
    }
    let plain = plain(query, select);
    let Some(selection) = &select.selection else {
        n.exact = plain;
        return n;
    };
    let key_type = |name: &str| -> Option<ColumnType> {
        if !v.group_by.iter().any(|g| g == name) {
            return None;
        }
        crate::spec::expr::column_type(schema.get(name)?)
    };
    let windows = v.window != Window::All;
    let q = &mut n.query;
    // Whether every conjunct went into `q`.
    let mut whole = true;
    let mut conjuncts = vec![selection];
    while let Some(e) = conjuncts.pop() {
        let taken = match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                conjuncts.push(left.as_ref());
                conjuncts.push(right.as_ref());
                true
            }
            Expr::Nested(inner) => {
                conjuncts.push(inner.as_ref());
                true
            }
            Expr::BinaryOp { left, op, right } => {
                let (column, op, value) = match (column_name(left), column_name(right)) {
                    (Some(c), None) => (c, op.clone(), right.as_ref()),
                    (None, Some(c)) => (c, flipped(op), left.as_ref()),
                    _ => {
                        whole = false;
                        continue;
                    }
                };
                // `t.page`: polars checks the qualifier; leave the statement to it.
                let qualified = [left, right]
                    .iter()
                    .any(|e| matches!(e.as_ref(), Expr::CompoundIdentifier(_)));
                let narrowed = if column == "window_start"
                    && windows
                    && let Some(us) = timestamp_value(value)
                {
                    bound(q, &op, us)
                } else if op == BinaryOperator::Eq
                    && let Some(t) = key_type(&column)
                    && let Some(text) = key_value(value, t)
                {
                    q.filters.push((column, text));
                    true
                } else {
                    false
                };
                narrowed && !qualified
            }
            Expr::Between {
                expr,
                negated: false,
                low,
                high,
            } if windows && column_name(expr).as_deref() == Some("window_start") => {
                match (timestamp_value(low), timestamp_value(high)) {
                    (Some(lo), Some(hi)) => {
                        bound(q, &BinaryOperator::GtEq, lo)
                            && bound(q, &BinaryOperator::LtEq, hi)
                            && matches!(expr.as_ref(), Expr::Identifier(_))
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        whole &= taken;
    }
    n.exact = plain && whole;
    n
}

/// A query with nothing but a projection, one FROM and a WHERE: no DISTINCT, GROUP BY,
/// HAVING, ORDER BY, LIMIT or anything else that changes which rows come out, or in what
/// order. Written as a full destructuring so a new clause in sqlparser fails to compile here
/// instead of being taken as absent.
fn plain(query: &Query, select: &Select) -> bool {
    let Query {
        with: None,
        body: _,
        order_by: None,
        limit_clause: None,
        fetch: None,
        locks,
        for_clause: None,
        settings: None,
        format_clause: None,
        pipe_operators,
    } = query
    else {
        return false;
    };
    let Select {
        select_token: _,
        optimizer_hints: _,
        distinct: None,
        select_modifiers: None,
        top: None,
        top_before_distinct: _,
        projection: _,
        exclude: None,
        into: None,
        from: _,
        lateral_views,
        prewhere: None,
        selection: _,
        connect_by,
        group_by: GroupByExpr::Expressions(group_by, group_by_modifiers),
        cluster_by,
        distribute_by,
        sort_by,
        having: None,
        named_window,
        qualify: None,
        window_before_qualify: _,
        value_table_mode: None,
        flavor: _,
    } = select
    else {
        return false;
    };
    locks.is_empty()
        && pipe_operators.is_empty()
        && lateral_views.is_empty()
        && connect_by.is_empty()
        && group_by.is_empty()
        && group_by_modifiers.is_empty()
        && cluster_by.is_empty()
        && distribute_by.is_empty()
        && sort_by.is_empty()
        && named_window.is_empty()
}

/// The columns a plain query's projection takes from the view, each `(column, output
/// name)`: `*`, or columns named as the view names them, optionally renamed by a lower-case
/// alias (the name PostgreSQL and polars then agree on). `None` for anything else.
fn projection(statement: &Statement, schema: &Schema) -> Option<Vec<(String, String)>> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let column = |e: &Expr| match e {
        Expr::Identifier(i) if schema.contains(&i.value) => Some(i.value.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(options) => {
                let WildcardAdditionalOptions {
                    wildcard_token: _,
                    opt_ilike: None,
                    opt_exclude: None,
                    opt_except: None,
                    opt_replace: None,
                    opt_rename: None,
                    opt_alias: None,
                } = options
                else {
                    return None;
                };
                out.extend(schema.iter_names().map(|n| (n.to_string(), n.to_string())));
            }
            SelectItem::UnnamedExpr(e) => {
                let c = column(e)?;
                out.push((c.clone(), c));
            }
            SelectItem::ExprWithAlias { expr, alias }
                if !alias.value.chars().any(char::is_uppercase) =>
            {
                out.push((column(expr)?, alias.value.clone()));
            }
            _ => return None,
        }
    }
    let mut names: Vec<&String> = out.iter().map(|(_, o)| o).collect();
    names.sort();
    names.dedup();
    (names.len() == out.len()).then_some(out)
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
/// `window_start OP us`; whether `OP` is one it can.
fn bound(q: &mut ViewQuery, op: &BinaryOperator, us: i64) -> bool {
    let floor = us.div_euclid(1000);
    let ceil = floor + i64::from(us.rem_euclid(1000) != 0);
    let (from, to) = match op {
        BinaryOperator::Eq => (Some(ceil), Some(floor + 1)),
        BinaryOperator::GtEq => (Some(ceil), None),
        BinaryOperator::Gt => (Some(floor + 1), None),
        BinaryOperator::Lt => (None, Some(ceil)),
        BinaryOperator::LtEq => (None, Some(floor + 1)),
        _ => return false,
    };
    if let Some(f) = from {
        q.from = Some(q.from.map_or(f, |x| x.max(f)));
    }
    if let Some(t) = to {
        q.to = Some(q.to.map_or(t, |x| x.min(t)));
    }
    true
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

    /// A view keyed by `k` (text) over 1-minute windows, with a metric `n`.
    fn keyed() -> (View, Schema) {
        let view = View {
            name: "v".into(),
            group_by: vec!["k".into()],
            window: Window::Tumbling {
                size: std::time::Duration::from_secs(60),
            },
            metrics: Vec::new(),
            sinks: Vec::new(),
        };
        let ts = DataType::Datetime(TimeUnit::Milliseconds, Some(TimeZone::UTC));
        let schema = Schema::from_iter([
            Field::new("window_start".into(), ts.clone()),
            Field::new("window_end".into(), ts),
            Field::new("k".into(), DataType::String),
            Field::new("n".into(), DataType::Int64),
        ]);
        (view, schema)
    }

    fn parsed(sql: &str) -> Statement {
        super::super::statement::parse(sql).unwrap().remove(0)
    }

    #[test]
    fn only_plain_key_and_window_filters_are_point_queries() {
        let (view, schema) = keyed();
        let exact = |sql: &str| narrowing(&parsed(sql), &view, &schema).exact;
        let t = "TIMESTAMP '2026-01-01 00:00:00'";
        for sql in [
            "SELECT * FROM v".to_string(),
            "SELECT * FROM v WHERE k = 'a'".into(),
            format!("SELECT k, n AS m FROM v WHERE ('a' = k) AND window_start >= {t}"),
            format!("SELECT n FROM v WHERE k = 'a' AND window_start BETWEEN {t} AND {t}"),
            format!("SELECT * FROM v WHERE window_start < {t} AND k = 'b' AND k = 'a'"),
        ] {
            assert!(exact(&sql), "{sql} is a point query");
            assert!(projection(&parsed(&sql), &schema).is_some(), "{sql}");
        }
        for sql in [
            "SELECT * FROM v WHERE k = 'a' AND true".to_string(),
            "SELECT * FROM v WHERE k = 'a' OR k = 'b'".into(),
            "SELECT * FROM v WHERE n = 1".into(),
            "SELECT * FROM v WHERE k = 1".into(),
            "SELECT * FROM v WHERE k <> 'a'".into(),
            "SELECT * FROM v WHERE v.k = 'a'".into(),
            "SELECT * FROM v WHERE k = 'a' ORDER BY n".into(),
            "SELECT * FROM v WHERE k = 'a' LIMIT 1".into(),
            "SELECT DISTINCT k FROM v WHERE k = 'a'".into(),
            "SELECT k, count(*) FROM v WHERE k = 'a' GROUP BY k".into(),
            format!("SELECT * FROM v WHERE window_start <> {t}"),
            "SELECT * FROM v WHERE k = 'a' AND k IN (SELECT k FROM v)".into(),
        ] {
            assert!(!exact(&sql), "{sql} is left to polars");
        }
        // A projection the index's frame answers as polars would: view columns, lower-case
        // aliases, no duplicates.
        for sql in [
            "SELECT K FROM v",
            "SELECT k AS Key FROM v",
            "SELECT k, k FROM v",
            "SELECT n + 1 FROM v",
            "SELECT v.* FROM v",
        ] {
            assert!(projection(&parsed(sql), &schema).is_none(), "{sql}");
        }
        assert_eq!(
            projection(&parsed("SELECT n AS total, k FROM v"), &schema),
            Some(vec![("n".into(), "total".into()), ("k".into(), "k".into())])
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
