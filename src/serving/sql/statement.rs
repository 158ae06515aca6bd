//! One SQL statement from a client, parsed (PostgreSQL dialect), classified, and rewritten
//! into what polars SQL runs:
//!
//! - `PIPELINE.VIEW` (and a view name that only one pipeline has) becomes the registered
//!   table of that view's answer, aliased by the view's name; `information_schema.*` and
//!   `pg_catalog.*` tables become the catalog's frames.
//! - Times: `now()`, `current_timestamp`, `current_date` become literals of the statement's
//!   start; `timestamptz` casts become UTC timestamps; a string with a zone (`'…Z'`,
//!   `'…+00'`, what Grafana's `$__timeFilter` expands to) compared with a value becomes a
//!   UTC timestamp literal.
//! - Session functions (`version()`, `current_schema()`, `current_setting(…)`, …) become
//!   literals.
//! - Anything that writes is refused: the views are read-only.

use std::collections::HashSet;
use std::ops::ControlFlow;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlparser::ast::{
    BinaryOperator, DataType as SqlType, Expr, Function, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, ObjectName, ObjectNamePart, Query, Set, Spanned, Statement,
    TableAlias, TableFactor, TimezoneInfo, TypedString, Value, ValueWithSpan, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use super::SqlError;

/// What a table name in a statement refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// View `view` (its index) of pipeline `pipeline`.
    View { pipeline: String, view: usize },
    /// A catalog table, by its qualified name (`information_schema.tables`).
    Catalog(&'static str),
}

/// A table a statement reads, under the name it is registered as for polars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub registered: String,
    pub source: Source,
}

/// The names a statement can use: every view, and the catalog tables.
pub trait Names {
    /// `(pipeline, view index)` of `schema.table`, or of `table` when one pipeline has it.
    fn view(&self, schema: Option<&str>, table: &str) -> Option<(String, usize, String)>;
    /// The catalog table `schema.table` (`schema` defaulting to `pg_catalog`).
    fn catalog(&self, schema: Option<&str>, table: &str) -> Option<&'static str>;
    /// Whether `schema` is a catalog schema (then an unknown table in it is an empty one).
    fn is_catalog_schema(&self, schema: &str) -> bool {
        matches!(schema, "pg_catalog" | "information_schema")
    }
}

/// What the session knows that statements may ask for.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub database: String,
    /// The statement's start, epoch microseconds (`now()`).
    pub now_us: i64,
    /// Backend process id reported to the client.
    pub pid: i32,
}

/// A classified statement.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A query run by polars over `tables`; `$n` placeholders are bound before it runs.
    Select {
        statement: Box<Statement>,
        tables: Vec<TableRef>,
        /// The highest `$n` used.
        params: usize,
    },
    /// A query over catalog tables lambda-ctl does not have (`pg_policy`, …): no rows, these
    /// columns (all text).
    Empty(Vec<String>),
    /// `SET …`: accepted, no effect, but for what the session keeps: `SET statement_timeout`
    /// and `SET lambda.as_of` (the instant the views are answered as of; `''` for now).
    Set {
        timeout: Option<String>,
        as_of: Option<String>,
    },
    /// `SHOW name`.
    Show(String),
    Begin,
    Commit,
    Rollback,
    /// Accepted with no effect, answering this command tag (`DISCARD ALL`, `DEALLOCATE`, …).
    Tag(&'static str),
    /// Nothing but whitespace, comments or `;`.
    Nothing,
}

/// Parses `sql` into its statements (one per `;`).
pub fn parse(sql: &str) -> Result<Vec<Statement>, SqlError> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| parse_error(sql, &e))
}

/// A parser error as SQLSTATE 42601 with the position it names (`… at Line: 1, Column: 8`).
fn parse_error(sql: &str, e: &ParserError) -> SqlError {
    let text = match e {
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => "statement nested too deeply".to_string(),
    };
    let (message, position) = match text.rfind(" at Line: ") {
        Some(at) => {
            let place = &text[at + " at Line: ".len()..];
            let mut parts = place.split(", Column: ");
            let line = parts.next().and_then(|l| l.trim().parse::<u64>().ok());
            let column = parts.next().and_then(|c| c.trim().parse::<u64>().ok());
            let pos = match (line, column) {
                (Some(l), Some(c)) => position_of(sql, l, c),
                _ => None,
            };
            (text[..at].to_string(), pos)
        }
        None => (text, None),
    };
    SqlError::new("42601", format!("syntax error: {message}")).at(position)
}

/// The 1-based character position of `line:column` (both 1-based) in `sql`.
pub fn position_of(sql: &str, line: u64, column: u64) -> Option<usize> {
    if line == 0 || column == 0 {
        return None;
    }
    let mut pos = 0usize;
    for (i, l) in sql.split('\n').enumerate() {
        if i as u64 + 1 == line {
            return Some(pos + column as usize);
        }
        pos += l.chars().count() + 1;
    }
    None
}

/// Classifies one parsed statement and rewrites it for polars.
pub fn classify(
    statement: Statement,
    sql: &str,
    names: &dyn Names,
    session: &Session,
) -> Result<Kind, SqlError> {
    match statement {
        Statement::Query(_) => rewrite(statement, sql, names, session),
        Statement::Set(set) => Ok(Kind::Set {
            timeout: assigned(&set, "statement_timeout"),
            as_of: assigned(&set, "lambda.as_of"),
        }),
        Statement::ShowVariable { variable } => Ok(Kind::Show(
            variable
                .iter()
                .map(|i| i.value.to_lowercase())
                .collect::<Vec<_>>()
                .join(" "),
        )),
        Statement::StartTransaction { .. } => Ok(Kind::Begin),
        Statement::Commit { .. } => Ok(Kind::Commit),
        Statement::Rollback { .. } => Ok(Kind::Rollback),
        Statement::Discard { .. } => Ok(Kind::Tag("DISCARD ALL")),
        Statement::Deallocate { .. } => Ok(Kind::Tag("DEALLOCATE")),
        Statement::Reset(_) => Ok(Kind::Tag("RESET")),
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Copy { .. }
        | Statement::Truncate(_) => Err(read_only(&statement)),
        other => {
            let verb = verb(&other);
            if is_ddl(&verb) {
                Err(read_only(&other))
            } else {
                Err(SqlError::new(
                    "0A000",
                    format!(
                        "{verb} is not supported: lambda-ctl answers SELECT over its views (and SET, SHOW, BEGIN, COMMIT)"
                    ),
                ))
            }
        }
    }
}

/// The statement's leading keywords (`CREATE TABLE`, `DROP`, …), for messages.
fn verb(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    match words.as_slice() {
        [first, second] if matches!(first.to_uppercase().as_str(), "CREATE" | "ALTER" | "DROP") => {
            format!("{} {}", first.to_uppercase(), second.to_uppercase())
        }
        [first, ..] => first.to_uppercase(),
        [] => "statement".to_string(),
    }
}

fn is_ddl(verb: &str) -> bool {
    [
        "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "RENAME", "VACUUM", "ANALYZE",
    ]
    .iter()
    .any(|v| verb.starts_with(v))
}

/// SQLSTATE 25006: the views are answers of the pipelines, not tables to write.
fn read_only(statement: &Statement) -> SqlError {
    SqlError::new(
        "25006",
        format!(
            "cannot execute {}: lambda-ctl's SQL interface is read-only (views are computed from the pipelines' events; send events to POST /v1/pipelines/PIPELINE/events)",
            verb(statement)
        ),
    )
}

/// The value of `SET name = …`, if that is what `set` sets.
fn assigned(set: &Set, name: &str) -> Option<String> {
    if let Set::SingleAssignment {
        variable, values, ..
    } = set
        && variable.to_string().eq_ignore_ascii_case(name)
        && let [value] = values.as_slice()
    {
        return Some(match value {
            Expr::Value(ValueWithSpan {
                value: Value::SingleQuotedString(s),
                ..
            }) => s.clone(),
            other => other.to_string(),
        });
    }
    None
}

fn rewrite(
    mut statement: Statement,
    sql: &str,
    names: &dyn Names,
    session: &Session,
) -> Result<Kind, SqlError> {
    let mut rewriter = Rewriter {
        sql,
        names,
        session,
        ctes: HashSet::new(),
        tables: Vec::new(),
        missing_catalog: false,
        params: 0,
        error: None,
    };
    let _ = statement.visit(&mut rewriter);
    if let Some(e) = rewriter.error {
        return Err(e);
    }
    if rewriter.missing_catalog {
        return Ok(Kind::Empty(output_names(&statement)));
    }
    Ok(Kind::Select {
        statement: Box::new(statement),
        tables: rewriter.tables,
        params: rewriter.params,
    })
}

/// The output column names of a query (for a catalog query answered with no rows).
fn output_names(statement: &Statement) -> Vec<String> {
    use sqlparser::ast::{SelectItem, SetExpr};
    let Statement::Query(q) = statement else {
        return Vec::new();
    };
    let mut body = q.body.as_ref();
    while let SetExpr::SetOperation { left, .. } = body {
        body = left.as_ref();
    }
    let SetExpr::Select(select) = body else {
        return vec!["?column?".to_string()];
    };
    select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => i.value.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(ids)) => {
                ids.last().map_or("?column?".into(), |i| i.value.clone())
            }
            SelectItem::UnnamedExpr(Expr::Function(f)) => last_name(&f.name),
            _ => "?column?".to_string(),
        })
        .collect()
}

/// The last part of a dotted name, lowercased unless quoted.
fn last_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(ObjectNamePart::as_ident)
        .map_or(String::new(), folded)
}

/// An identifier as PostgreSQL resolves it: unquoted ones fold to lower case.
fn folded(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

struct Rewriter<'a> {
    sql: &'a str,
    names: &'a dyn Names,
    session: &'a Session,
    /// Names of the statement's common table expressions (not views).
    ctes: HashSet<String>,
    tables: Vec<TableRef>,
    /// The statement reads a catalog table lambda-ctl does not have.
    missing_catalog: bool,
    params: usize,
    error: Option<SqlError>,
}

impl Rewriter<'_> {
    fn fail(&mut self, e: SqlError) -> ControlFlow<()> {
        if self.error.is_none() {
            self.error = Some(e);
        }
        ControlFlow::Break(())
    }

    fn position(&self, span: sqlparser::tokenizer::Span) -> Option<usize> {
        position_of(self.sql, span.start.line, span.start.column)
    }

    /// The registered name of a table reference, registering it on first use.
    fn register(&mut self, source: Source) -> String {
        if let Some(t) = self.tables.iter().find(|t| t.source == source) {
            return t.registered.clone();
        }
        let registered = format!("__lambda_{}", self.tables.len());
        self.tables.push(TableRef {
            registered: registered.clone(),
            source,
        });
        registered
    }

    fn table(&mut self, name: &mut ObjectName, alias: &mut Option<TableAlias>) -> ControlFlow<()> {
        let parts: Vec<Ident> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().cloned())
            .collect();
        if parts.len() != name.0.len() || parts.is_empty() {
            return ControlFlow::Continue(());
        }
        let (schema, table) = match parts.as_slice() {
            [t] => (None, folded(t)),
            [s, t] => (Some(folded(s)), folded(t)),
            // database.schema.table: the database is this one.
            [_, s, t] => (Some(folded(s)), folded(t)),
            _ => {
                let pos = self.position(name.span());
                return self.fail(
                    SqlError::new("42601", format!("improper qualified name: {name}")).at(pos),
                );
            }
        };
        if schema.is_none() && self.ctes.contains(&table) {
            return ControlFlow::Continue(());
        }
        let source = if let Some((pipeline, view, view_name)) =
            self.names.view(schema.as_deref(), &table)
        {
            if alias.is_none() {
                *alias = Some(TableAlias {
                    explicit: true,
                    name: Ident::with_quote('"', view_name),
                    columns: Vec::new(),
                    at: None,
                });
            }
            Source::View { pipeline, view }
        } else if let Some(c) = self.names.catalog(schema.as_deref(), &table) {
            if alias.is_none() {
                *alias = Some(TableAlias {
                    explicit: true,
                    name: Ident::with_quote('"', table.clone()),
                    columns: Vec::new(),
                    at: None,
                });
            }
            Source::Catalog(c)
        } else if schema
            .as_deref()
            .is_some_and(|s| self.names.is_catalog_schema(s))
            || (schema.is_none() && table.starts_with("pg_"))
        {
            self.missing_catalog = true;
            return ControlFlow::Continue(());
        } else {
            let pos = self.position(name.span());
            return self.fail(
                SqlError::new(
                    "42P01",
                    format!(
                        "relation \"{}\" does not exist (views are tables PIPELINE.VIEW; list them with \\dt *.* or information_schema.tables)",
                        name.to_string().replace('"', "")
                    ),
                )
                .at(pos),
            );
        };
        let registered = self.register(source);
        *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::with_quote(
            '"', registered,
        ))]);
        ControlFlow::Continue(())
    }

    /// A session function's value as a literal, or `None` for any other function.
    fn function(&mut self, f: &Function) -> Result<Option<Expr>, SqlError> {
        let name = last_name(&f.name);
        let no_args = match &f.args {
            FunctionArguments::None => true,
            FunctionArguments::List(l) => l.args.is_empty(),
            FunctionArguments::Subquery(_) => false,
        };
        let s = self.session;
        Ok(Some(match name.as_str() {
            "now"
            | "current_timestamp"
            | "transaction_timestamp"
            | "statement_timestamp"
            | "clock_timestamp"
            | "localtimestamp"
                if no_args =>
            {
                timestamp_literal(s.now_us)
            }
            "current_date" if no_args => {
                let day = DateTime::from_timestamp_micros(s.now_us)
                    .map_or_else(String::new, |t| t.format("%Y-%m-%d").to_string());
                typed(SqlType::Date, day)
            }
            "version" if no_args => string(super::version()),
            "current_schema" if no_args => string("public".into()),
            "current_database" | "current_catalog" if no_args => string(s.database.clone()),
            "current_user" | "session_user" | "user" | "current_role" if no_args => {
                string(s.user.clone())
            }
            "pg_backend_pid" if no_args => number(s.pid.to_string()),
            "date_trunc" => return date_trunc(f).map(Some),
            "to_timestamp" => match args(f).as_slice() {
                [seconds] => expr(&format!(
                    "CAST(CAST(({seconds}) * 1000000 AS BIGINT) AS TIMESTAMP)"
                ))?,
                _ => return Ok(None),
            },
            "current_setting" => {
                let arg = match &f.args {
                    FunctionArguments::List(l) => l.args.first(),
                    _ => None,
                };
                let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(ValueWithSpan {
                    value: Value::SingleQuotedString(setting),
                    ..
                })))) = arg
                else {
                    return Err(SqlError::new(
                        "0A000",
                        "current_setting takes a setting name as a string literal",
                    ));
                };
                match super::setting(&setting.to_lowercase()) {
                    Some(v) => string(v),
                    None => {
                        return Err(SqlError::new(
                            "42704",
                            format!("unrecognized configuration parameter \"{setting}\""),
                        ));
                    }
                }
            }
            _ => return Ok(None),
        }))
    }
}

/// The plain arguments of a function call.
fn args(f: &Function) -> Vec<&Expr> {
    match &f.args {
        FunctionArguments::List(l) => l
            .args
            .iter()
            .filter_map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses one expression (of the rewriter's own making).
fn expr(sql: &str) -> Result<Expr, SqlError> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| SqlError::new("XX000", format!("rewriting `{sql}`: {e}")))
}

/// `date_trunc('unit', t)`: `t` printed down to the unit and read back.
fn date_trunc(f: &Function) -> Result<Expr, SqlError> {
    let given = args(f);
    let [unit, time] = given.as_slice() else {
        return Err(SqlError::new(
            "42883",
            "date_trunc takes a unit and a timestamp",
        ));
    };
    let Expr::Value(ValueWithSpan {
        value: Value::SingleQuotedString(unit),
        ..
    }) = unit
    else {
        return Err(SqlError::new(
            "0A000",
            "date_trunc's unit must be a string literal ('minute', 'hour', 'day', …)",
        ));
    };
    let format = match unit.to_lowercase().as_str() {
        "second" | "seconds" => "%Y-%m-%d %H:%M:%S",
        "minute" | "minutes" => "%Y-%m-%d %H:%M:00",
        "hour" | "hours" => "%Y-%m-%d %H:00:00",
        "day" | "days" => "%Y-%m-%d 00:00:00",
        "month" | "months" => "%Y-%m-01 00:00:00",
        "year" | "years" => "%Y-01-01 00:00:00",
        other => {
            return Err(SqlError::new(
                "22023",
                format!(
                    "date_trunc unit \"{other}\" not supported (second, minute, hour, day, month, year)"
                ),
            ));
        }
    };
    expr(&format!(
        "strptime(strftime({time}, '{format}'), '%Y-%m-%d %H:%M:%S')"
    ))
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(folded(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => self.table(name, alias),
            TableFactor::Table { name, .. } | TableFactor::Function { name, .. } => {
                let pos = self.position(name.span());
                self.fail(
                    SqlError::new("0A000", format!("table function {name} is not supported"))
                        .at(pos),
                )
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::Value(ValueWithSpan {
                value: Value::Placeholder(p),
                span,
            }) => match p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n >= 1 => self.params = self.params.max(n),
                _ => {
                    let pos = self.position(*span);
                    return self.fail(
                        SqlError::new("42601", format!("invalid parameter `{p}` (use $1, $2, …)"))
                            .at(pos),
                    );
                }
            },
            Expr::Function(f) => match self.function(f) {
                Ok(Some(literal)) => *expr = literal,
                Ok(None) => {
                    // `pg_catalog.lower(x)` is `lower(x)`; polars knows functions by name.
                    let name = last_name(&f.name);
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]);
                }
                Err(e) => {
                    let pos = self.position(f.name.span());
                    return self.fail(e.at(pos));
                }
            },
            Expr::Cast {
                data_type,
                expr: inner,
                ..
            } => {
                if let SqlType::Timestamp(p, tz) = data_type
                    && !matches!(tz, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone)
                {
                    *data_type = SqlType::Timestamp(*p, TimezoneInfo::None);
                    if let Some(lit) = zoned_literal(inner) {
                        **inner = lit;
                    }
                }
            }
            Expr::TypedString(TypedString {
                data_type: SqlType::Timestamp(_, tz),
                value,
                ..
            }) if !matches!(tz, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => {
                if let Value::SingleQuotedString(s) = &value.value
                    && let Some(us) = parse_zoned(s)
                {
                    *expr = timestamp_literal(us);
                } else if let Value::SingleQuotedString(s) = &value.value {
                    *expr = typed(SqlType::Timestamp(None, TimezoneInfo::None), s.clone());
                }
            }
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                if let Some(lit) = zoned_literal(right) {
                    **right = lit;
                }
                if let Some(lit) = zoned_literal(left) {
                    **left = lit;
                }
            }
            Expr::Between { low, high, .. } => {
                if let Some(lit) = zoned_literal(low) {
                    **low = lit;
                }
                if let Some(lit) = zoned_literal(high) {
                    **high = lit;
                }
            }
            Expr::InList { list, .. } => {
                for item in list.iter_mut() {
                    if let Some(lit) = zoned_literal(item) {
                        *item = lit;
                    }
                }
            }
            Expr::CompoundIdentifier(ids) if ids.len() == 3 => {
                // `pipeline.view.column` is `view.column` (the table is aliased by its view).
                let schema = folded(&ids[0]);
                let table = folded(&ids[1]);
                if self.names.view(Some(schema.as_str()), &table).is_some() {
                    ids.remove(0);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    )
}

/// A string literal holding a time with a zone, as a UTC timestamp literal.
fn zoned_literal(e: &Expr) -> Option<Expr> {
    if let Expr::Value(ValueWithSpan {
        value: Value::SingleQuotedString(s),
        ..
    }) = e
    {
        return parse_zoned(s).map(timestamp_literal);
    }
    None
}

/// Epoch microseconds of a time with an explicit zone: RFC 3339 (`2026-11-21T10:00:00Z`,
/// `…+01:00`) or PostgreSQL's output (`2026-11-21 10:00:00.5+00`).
pub fn parse_zoned(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    let with_t = s.replacen(' ', "T", 1);
    if let Ok(t) = DateTime::parse_from_rfc3339(&with_t) {
        return Some(t.timestamp_micros());
    }
    // `+00` / `-05`: an hour-only offset.
    let tail = s.rfind(['+', '-'])?;
    let (time, zone) = s.split_at(tail);
    if zone.len() == 3 && zone[1..].chars().all(|c| c.is_ascii_digit()) && time.contains(':') {
        let full = format!("{}{zone}:00", time.replacen(' ', "T", 1));
        return DateTime::parse_from_rfc3339(&full)
            .ok()
            .map(|t| t.timestamp_micros());
    }
    None
}

/// `TIMESTAMP 'YYYY-MM-DD HH:MM:SS.ffffff'` (UTC, microseconds).
pub fn timestamp_literal(us: i64) -> Expr {
    let text = DateTime::<Utc>::from_timestamp_micros(us).map_or_else(
        || "1970-01-01 00:00:00".to_string(),
        |t| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    );
    typed(SqlType::Timestamp(None, TimezoneInfo::None), text)
}

/// A naive `YYYY-MM-DD HH:MM:SS[.f]` as epoch microseconds (UTC).
pub fn parse_naive(s: &str) -> Option<i64> {
    let s = s.trim().replacen('T', " ", 1);
    NaiveDateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros())
}

fn typed(data_type: SqlType, value: String) -> Expr {
    Expr::TypedString(TypedString {
        data_type,
        value: ValueWithSpan {
            value: Value::SingleQuotedString(value),
            span: sqlparser::tokenizer::Span::empty(),
        },
        uses_odbc_syntax: false,
    })
}

pub fn string(s: String) -> Expr {
    Expr::Value(ValueWithSpan {
        value: Value::SingleQuotedString(s),
        span: sqlparser::tokenizer::Span::empty(),
    })
}

pub fn number(n: String) -> Expr {
    Expr::Value(ValueWithSpan {
        value: Value::Number(n, false),
        span: sqlparser::tokenizer::Span::empty(),
    })
}

pub fn null() -> Expr {
    Expr::Value(ValueWithSpan {
        value: Value::Null,
        span: sqlparser::tokenizer::Span::empty(),
    })
}

/// Replaces every `$n` of `statement` with `values[n - 1]`.
pub fn bind(statement: &mut Statement, values: &[Expr]) -> Result<(), SqlError> {
    let mut missing = None;
    let _ = sqlparser::ast::visit_expressions_mut(statement, |e| {
        if let Expr::Value(ValueWithSpan {
            value: Value::Placeholder(p),
            ..
        }) = e
            && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
        {
            match n.checked_sub(1).and_then(|i| values.get(i)) {
                Some(v) => *e = v.clone(),
                None => {
                    missing = Some(n);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    });
    match missing {
        Some(n) => Err(SqlError::new(
            "08P01",
            format!("there is no parameter ${n} bound"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Project;

    impl Names for Project {
        fn view(&self, schema: Option<&str>, table: &str) -> Option<(String, usize, String)> {
            match (schema, table) {
                (Some("web") | None, "pageviews") => Some(("web".into(), 0, "pageviews".into())),
                _ => None,
            }
        }
        fn catalog(&self, schema: Option<&str>, table: &str) -> Option<&'static str> {
            match (schema, table) {
                (Some("information_schema"), "tables") => Some("information_schema.tables"),
                _ => None,
            }
        }
    }

    fn session() -> Session {
        Session {
            user: "grafana".into(),
            database: "lambda".into(),
            now_us: 1_763_719_200_000_000,
            pid: 7,
        }
    }

    fn one(sql: &str) -> Result<Kind, SqlError> {
        let mut statements = parse(sql)?;
        assert_eq!(statements.len(), 1);
        classify(statements.remove(0), sql, &Project, &session())
    }

    fn rewritten(sql: &str) -> String {
        match one(sql).unwrap() {
            Kind::Select { statement, .. } => statement.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn views_become_registered_tables_aliased_by_their_name() {
        assert_eq!(
            rewritten("SELECT page FROM web.pageviews WHERE views > 1"),
            "SELECT page FROM \"__lambda_0\" AS \"pageviews\" WHERE views > 1"
        );
        assert_eq!(
            rewritten("SELECT web.pageviews.page FROM \"web\".\"pageviews\""),
            "SELECT pageviews.page FROM \"__lambda_0\" AS \"pageviews\""
        );
    }

    #[test]
    fn grafana_time_filter_and_now_become_utc_timestamps() {
        assert_eq!(
            rewritten(
                "SELECT * FROM web.pageviews WHERE window_start BETWEEN '2025-11-21T09:00:00Z' AND '2025-11-21T10:00:00.5+01:00'"
            ),
            "SELECT * FROM \"__lambda_0\" AS \"pageviews\" WHERE window_start BETWEEN TIMESTAMP '2025-11-21 09:00:00.000000' AND TIMESTAMP '2025-11-21 09:00:00.500000'"
        );
        assert_eq!(
            rewritten("SELECT now() - interval '1 hour', version()"),
            format!(
                "SELECT TIMESTAMP '2025-11-21 10:00:00.000000' - INTERVAL '1 hour', '{}'",
                crate::serving::sql::version()
            )
        );
        assert_eq!(
            rewritten("SELECT '2025-11-21 10:00:00+00'::timestamptz"),
            "SELECT TIMESTAMP '2025-11-21 10:00:00.000000'::TIMESTAMP"
        );
    }

    #[test]
    fn unknown_tables_are_errors_at_their_position() {
        let e = one("SELECT 1 FROM web.nope").unwrap_err();
        assert_eq!(e.code, "42P01");
        assert_eq!(e.position, Some(15));
        let e = one("SELEC 1").unwrap_err();
        assert_eq!(e.code, "42601");
        assert_eq!(e.position, Some(1));
    }

    #[test]
    fn writes_are_refused_and_session_statements_accepted() {
        for sql in [
            "INSERT INTO web.pageviews VALUES (1)",
            "UPDATE web.pageviews SET views = 1",
            "DELETE FROM web.pageviews",
            "CREATE TABLE t (a int)",
            "DROP TABLE web.pageviews",
        ] {
            let e = one(sql).unwrap_err();
            assert_eq!(e.code, "25006", "{sql}");
            assert!(e.message.contains("read-only"), "{sql}: {}", e.message);
        }
        assert!(matches!(
            one("SET extra_float_digits = 3").unwrap(),
            Kind::Set {
                timeout: None,
                as_of: None
            }
        ));
        assert!(matches!(
            one("SET statement_timeout = '5s'").unwrap(),
            Kind::Set { timeout: Some(t), .. } if t == "5s"
        ));
        assert!(matches!(
            one("SET lambda.as_of = '2026-12-03T09:00:00Z'").unwrap(),
            Kind::Set { as_of: Some(t), .. } if t == "2026-12-03T09:00:00Z"
        ));
        assert!(matches!(one("SHOW TimeZone").unwrap(), Kind::Show(s) if s == "timezone"));
        assert!(matches!(one("BEGIN").unwrap(), Kind::Begin));
    }

    #[test]
    fn unmodelled_catalog_tables_answer_no_rows() {
        match one("SELECT pol.polname, pol.polpermissive AS p FROM pg_catalog.pg_policy pol")
            .unwrap()
        {
            Kind::Empty(cols) => assert_eq!(cols, ["polname", "p"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parameters_are_counted_and_bound() {
        let Kind::Select {
            mut statement,
            params,
            ..
        } = one("SELECT * FROM web.pageviews WHERE page = $1 AND views > $2").unwrap()
        else {
            panic!()
        };
        assert_eq!(params, 2);
        bind(&mut statement, &[string("/a".into()), number("3".into())]).unwrap();
        assert!(statement.to_string().ends_with("page = '/a' AND views > 3"));
    }

    #[test]
    fn zoned_times_parse_in_both_forms() {
        let t = 1_763_719_200_000_000;
        assert_eq!(parse_zoned("2025-11-21T10:00:00Z"), Some(t));
        assert_eq!(parse_zoned("2025-11-21 10:00:00+00"), Some(t));
        assert_eq!(parse_zoned("2025-11-21 11:00:00+01"), Some(t));
        assert_eq!(parse_zoned("2025-11-21 10:00:00"), None);
        assert_eq!(parse_zoned("/p/1"), None);
        assert_eq!(parse_naive("2025-11-21 10:00:00"), Some(t));
    }
}
