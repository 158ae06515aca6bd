//! The PostgreSQL protocol side, on `pgwire`: startup and authentication, simple query (any
//! number of statements) and extended query (Parse/Bind/Describe/Execute with parameters in
//! text or binary format). Each statement is classified and rewritten afresh when it runs, so
//! `now()` in a prepared statement is the time of each execution.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{Sink, stream};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password, random_nonce};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo, QueryResponse,
    Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, METADATA_DATABASE, METADATA_USER, PgWireServerHandlers, Type,
};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use polars::prelude::*;
use sqlparser::ast::{Expr, Statement};
use tokio::sync::Semaphore;

use super::statement::{self, Kind, Session};
use super::types::{Rows, fields};
use super::{Engine, MAX_RUNNING, SqlError};
use crate::clock::Tick;
use crate::serving::time::parse_instant;

/// SCRAM iterations (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;
/// Where the session keeps its `SET statement_timeout`.
const TIMEOUT_KEY: &str = "lambda.statement_timeout";
/// Where the session keeps its `SET lambda.as_of`: the instant views are answered as of.
const AS_OF_KEY: &str = "lambda.as_of";
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

pub struct Handlers {
    queries: Arc<Queries>,
    params: Arc<DefaultServerParameterProvider>,
}

impl Handlers {
    pub fn new(engine: Arc<Engine>) -> Handlers {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = format!("16.6 (lambda-ctl {})", env!("CARGO_PKG_VERSION"));
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        Handlers {
            queries: Arc::new(Queries {
                engine,
                running: Semaphore::new(MAX_RUNNING),
                parser: Arc::new(Prepare),
            }),
            params: Arc::new(params),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    /// One per connection: SCRAM keeps the exchange's state.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let sasl = self.queries.engine.token.as_ref().map(|token| {
            let mut scram = ScramAuth::new(Arc::new(Token(token.clone())));
            scram.set_iterations(SCRAM_ITERATIONS);
            SASLAuthStartupHandler::new(self.params.clone()).with_scram(scram)
        });
        Arc::new(Startup {
            sasl,
            params: self.params.clone(),
        })
    }
}

/// `serve.token` as every user's password. Its `Debug` never shows it.
struct Token(String);

impl Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[async_trait]
impl AuthSource for Token {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        let salt = random_nonce().into_bytes();
        let salted = gen_salted_password(&self.0, &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt), salted))
    }
}

/// Without a token anyone who reaches the port is let in (as with the HTTP API).
struct Startup {
    sasl: Option<SASLAuthStartupHandler<DefaultServerParameterProvider>>,
    params: Arc<DefaultServerParameterProvider>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let Some(sasl) = &self.sasl {
            return sasl.on_startup(client, message).await;
        }
        if let PgWireFrontendMessage::Startup(ref startup) = message {
            protocol_negotiation(client, startup).await?;
            save_startup_parameters_to_metadata(client, startup);
            finish_authentication(client, self.params.as_ref()).await?;
        }
        Ok(())
    }
}

/// A statement as prepared by Parse: its text and parse tree, classified again when it runs.
#[derive(Debug, Clone)]
pub struct Prepared {
    sql: String,
    /// `None` for an empty statement.
    statement: Option<Statement>,
}

/// Parses the statement of a Parse message (syntax errors are reported there).
#[derive(Debug)]
pub struct Prepare;

#[async_trait]
impl QueryParser for Prepare {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Prepared>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = statement::parse(sql)?;
        if statements.len() > 1 {
            return Err(SqlError::new(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            )
            .into());
        }
        Ok(Prepared {
            sql: sql.to_string(),
            statement: statements.pop(),
        })
    }
}

pub struct Queries {
    engine: Arc<Engine>,
    running: Semaphore,
    parser: Arc<Prepare>,
}

impl Queries {
    fn session<C: ClientInfo + Send + Sync>(&self, client: &C) -> Session {
        let meta = client.metadata();
        Session {
            user: meta.get(METADATA_USER).cloned().unwrap_or_default(),
            database: meta.get(METADATA_DATABASE).cloned().unwrap_or_default(),
            now_us: chrono::Utc::now().timestamp_micros(),
            pid: std::process::id() as i32,
        }
    }

    /// The session's statement timeout: `SET statement_timeout` may lower the server's.
    fn timeout<C: ClientInfo + Send + Sync>(&self, client: &C) -> Duration {
        let limit = self.engine.settings.statement_timeout;
        client
            .metadata()
            .get(TIMEOUT_KEY)
            .and_then(|t| parse_timeout(t))
            .filter(|t| !t.is_zero())
            .map_or(limit, |t| t.min(limit))
    }

    /// The session's `SET lambda.as_of`, resolved now (relative forms count from the
    /// statement); `None` when unset or `''`.
    fn as_of<C: ClientInfo + Send + Sync>(&self, client: &C) -> Result<Option<Tick>, SqlError> {
        match client.metadata().get(AS_OF_KEY) {
            Some(t) if !t.trim().is_empty() => parse_instant(t, crate::clock::now_ms())
                .map(Some)
                .map_err(|e| SqlError::new("22023", format!("lambda.as_of: {e}"))),
            _ => Ok(None),
        }
    }

    /// A catalog answer for `sql` (psql's and Grafana's catalog queries), if it is one.
    fn recognized(&self, sql: &str) -> Option<DataFrame> {
        self.engine.catalog().recognize(sql)
    }

    /// Runs one classified statement.
    async fn run<C: ClientInfo + Send + Sync>(
        &self,
        client: &mut C,
        kind: Kind,
        sql: &str,
        format: &(dyn Fn(usize) -> FieldFormat + Sync),
    ) -> Result<Response, SqlError> {
        match kind {
            Kind::Select {
                statement, tables, ..
            } => {
                let as_of = self.as_of(client)?;
                let df = self
                    .blocking(client, sql, move |engine, sql| {
                        engine.run(&statement, &tables, sql, as_of)
                    })
                    .await?;
                Ok(rows(&df, format)?)
            }
            Kind::Empty(columns) => {
                let fields: Vec<FieldInfo> = columns
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| FieldInfo::new(c, None, None, Type::TEXT, format(i)))
                    .collect();
                Ok(Response::Query(QueryResponse::new(
                    Arc::new(fields),
                    stream::empty(),
                )))
            }
            Kind::Set { timeout, as_of } => {
                if let Some(t) = as_of {
                    if !t.trim().is_empty() {
                        parse_instant(&t, crate::clock::now_ms()).map_err(|e| {
                            SqlError::new(
                                "22023",
                                format!("invalid value for parameter \"lambda.as_of\": {e}"),
                            )
                        })?;
                    }
                    client.metadata_mut().insert(AS_OF_KEY.to_string(), t);
                }
                if let Some(t) = timeout {
                    if parse_timeout(&t).is_none() {
                        return Err(SqlError::new(
                            "22023",
                            format!("invalid value for parameter \"statement_timeout\": \"{t}\""),
                        ));
                    }
                    client.metadata_mut().insert(TIMEOUT_KEY.to_string(), t);
                }
                Ok(Response::Execution(Tag::new("SET")))
            }
            Kind::Show(name) => {
                // `SHOW lambda.as_of` names the setting as it is set.
                let name = if name == "lambda as_of" {
                    AS_OF_KEY.to_string()
                } else {
                    name
                };
                let value = if name == "statement_timeout" {
                    Some(format!("{}ms", self.timeout(client).as_millis()))
                } else if name == AS_OF_KEY {
                    Some(
                        client
                            .metadata()
                            .get(AS_OF_KEY)
                            .cloned()
                            .unwrap_or_default(),
                    )
                } else {
                    super::setting(&name)
                };
                let Some(value) = value else {
                    return Err(SqlError::new(
                        "42704",
                        format!("unrecognized configuration parameter \"{name}\""),
                    ));
                };
                let df = DataFrame::new(1, vec![Column::new(name.as_str().into(), [value])])
                    .map_err(|e| SqlError::new("XX000", e.to_string()))?;
                Ok(rows(&df, format)?)
            }
            Kind::Begin => Ok(Response::TransactionStart(Tag::new("BEGIN"))),
            Kind::Commit => Ok(Response::TransactionEnd(Tag::new("COMMIT"))),
            Kind::Rollback => Ok(Response::TransactionEnd(Tag::new("ROLLBACK"))),
            Kind::Tag(tag) => Ok(Response::Execution(Tag::new(tag))),
            Kind::Nothing => Ok(Response::EmptyQuery),
        }
    }

    /// Runs `f` on the blocking pool, one of at most [`MAX_RUNNING`], within the timeout.
    async fn blocking<C: ClientInfo + Send + Sync, T: Send + 'static>(
        &self,
        client: &C,
        sql: &str,
        f: impl FnOnce(&Engine, &str) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, SqlError> {
        let timeout = self.timeout(client);
        let engine = self.engine.clone();
        let sql = sql.to_string();
        let work = async {
            let _turn = self
                .running
                .acquire()
                .await
                .map_err(|_| SqlError::new("57P01", "the server is shutting down"))?;
            match tokio::task::spawn_blocking(move || f(engine.as_ref(), sql.as_str())).await {
                Ok(result) => result,
                Err(e) => Err(SqlError::new(
                    "XX000",
                    format!("the statement failed inside the query engine: {e}"),
                )),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(SqlError::new(
                "57014",
                format!(
                    "canceling statement due to statement timeout ({} ms; serve.sql.statement_timeout)",
                    timeout.as_millis()
                ),
            )),
        }
    }

    /// The result columns of a prepared statement with `types` for its parameters.
    async fn describe<C: ClientInfo + Send + Sync>(
        &self,
        client: &C,
        prepared: &Prepared,
        types: &[Type],
        format: &(dyn Fn(usize) -> FieldFormat + Sync),
    ) -> Result<Vec<FieldInfo>, SqlError> {
        if let Some(df) = self.recognized(&prepared.sql) {
            return Ok(fields(df.schema(), format));
        }
        let session = self.session(client);
        let Some(st) = prepared.statement.clone() else {
            return Ok(Vec::new());
        };
        match statement::classify(st, &prepared.sql, &*self.engine.catalog(), &session)? {
            Kind::Select {
                mut statement,
                tables,
                params,
            } => {
                let values: Vec<Expr> = (0..params)
                    .map(|i| sample(types.get(i).unwrap_or(&Type::TEXT)))
                    .collect();
                statement::bind(&mut statement, &values)?;
                let schema = self
                    .blocking(client, &prepared.sql, move |engine, sql| {
                        engine.describe(&statement, &tables, sql)
                    })
                    .await?;
                Ok(fields(&schema, format))
            }
            Kind::Empty(columns) => Ok(columns
                .into_iter()
                .enumerate()
                .map(|(i, c)| FieldInfo::new(c, None, None, Type::TEXT, format(i)))
                .collect()),
            Kind::Show(name) => Ok(vec![FieldInfo::new(
                name,
                None,
                None,
                Type::TEXT,
                format(0),
            )]),
            _ => Ok(Vec::new()),
        }
    }
}

/// A result frame as a query response.
fn rows(
    df: &DataFrame,
    format: &(dyn Fn(usize) -> FieldFormat + Sync),
) -> Result<Response, SqlError> {
    let fields = Arc::new(fields(df.schema(), format));
    let rows = Rows::new(df, fields.clone())
        .map_err(|e| SqlError::new("XX000", format!("encoding the result: {e}")))?;
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

/// `SET statement_timeout` values: milliseconds, or a number with a unit (`5s`, `1min`).
fn parse_timeout(text: &str) -> Option<Duration> {
    let t = text.trim().trim_matches('\'').trim();
    if let Ok(ms) = t.parse::<u64>() {
        return Some(Duration::from_millis(ms));
    }
    let t = t.replace(' ', "");
    let t = t.strip_suffix("min").map(|m| format!("{m}m")).unwrap_or(t);
    crate::spec::duration::parse(&t).ok()
}

/// A value of type `t` standing in for a parameter while a statement is described.
fn sample(t: &Type) -> Expr {
    match *t {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => statement::number("0".into()),
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => statement::number("0.5".into()),
        Type::BOOL => bool_literal(false),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => statement::timestamp_literal(0),
        Type::DATE => date_literal("1970-01-01"),
        _ => statement::string(String::new()),
    }
}

fn bool_literal(b: bool) -> Expr {
    Expr::Value(sqlparser::ast::ValueWithSpan {
        value: sqlparser::ast::Value::Boolean(b),
        span: sqlparser::tokenizer::Span::empty(),
    })
}

fn date_literal(day: &str) -> Expr {
    Expr::TypedString(sqlparser::ast::TypedString {
        data_type: sqlparser::ast::DataType::Date,
        value: sqlparser::ast::ValueWithSpan {
            value: sqlparser::ast::Value::SingleQuotedString(day.to_string()),
            span: sqlparser::tokenizer::Span::empty(),
        },
        uses_odbc_syntax: false,
    })
}

/// Parameter `i` of a portal as a literal of its type.
fn parameter(portal: &Portal<Prepared>, i: usize, t: &Type) -> Result<Expr, SqlError> {
    let bad = |what: &str| {
        SqlError::new(
            "22P02",
            format!("parameter ${}: invalid {what} value", i + 1),
        )
    };
    let Some(Some(raw)) = portal.parameters.get(i) else {
        return Ok(statement::null());
    };
    let binary = format_of(&portal.parameter_format, i) == FieldFormat::Binary;
    let text = || std::str::from_utf8(raw).map_err(|_| bad("text"));
    Ok(match *t {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            let v: i64 = if binary {
                match raw.len() {
                    2 => i64::from(i16::from_be_bytes([raw[0], raw[1]])),
                    4 => i64::from(i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]])),
                    8 => i64::from_be_bytes(raw[..8].try_into().map_err(|_| bad("integer"))?),
                    _ => return Err(bad("integer")),
                }
            } else {
                text()?.trim().parse().map_err(|_| bad("integer"))?
            };
            statement::number(v.to_string())
        }
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => {
            let v: f64 = if binary {
                match (raw.len(), t) {
                    (4, &Type::FLOAT4) => {
                        f64::from(f32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
                    }
                    (8, &Type::FLOAT8) => {
                        f64::from_be_bytes(raw[..8].try_into().map_err(|_| bad("number"))?)
                    }
                    _ => return Err(bad("binary number (send numeric parameters as text)")),
                }
            } else {
                text()?.trim().parse().map_err(|_| bad("number"))?
            };
            if !v.is_finite() {
                return Err(bad("finite number"));
            }
            statement::number(format!("{v:?}"))
        }
        Type::BOOL => {
            let v = if binary {
                raw.first().is_some_and(|b| *b != 0)
            } else {
                match text()?.trim().to_lowercase().as_str() {
                    "t" | "true" | "1" | "on" | "yes" | "y" => true,
                    "f" | "false" | "0" | "off" | "no" | "n" => false,
                    _ => return Err(bad("boolean")),
                }
            };
            bool_literal(v)
        }
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let us = if binary {
                i64::from_be_bytes(raw[..].try_into().map_err(|_| bad("timestamp"))?)
                    .checked_add(PG_EPOCH_US)
                    .ok_or_else(|| bad("timestamp"))?
            } else {
                let s = text()?;
                statement::parse_zoned(s)
                    .or_else(|| statement::parse_naive(s))
                    .ok_or_else(|| bad("timestamp"))?
            };
            statement::timestamp_literal(us)
        }
        Type::DATE => {
            let day = if binary {
                let days = i32::from_be_bytes(raw[..].try_into().map_err(|_| bad("date"))?);
                chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
                    .and_then(|d| d.checked_add_signed(chrono::Duration::days(i64::from(days))))
                    .ok_or_else(|| bad("date"))?
            } else {
                chrono::NaiveDate::parse_from_str(text()?.trim(), "%Y-%m-%d")
                    .map_err(|_| bad("date"))?
            };
            date_literal(&day.format("%Y-%m-%d").to_string())
        }
        // Text types are UTF-8 in both formats.
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON => {
            statement::string(text()?.to_string())
        }
        _ if !binary => statement::string(text()?.to_string()),
        _ => {
            return Err(SqlError::new(
                "0A000",
                format!(
                    "parameter ${}: binary format of type {} is not supported; send it as text",
                    i + 1,
                    t.name()
                ),
            ));
        }
    })
}

/// The format of value `i` under `format` (a client sending fewer codes than values gets
/// text for the rest, not a panic).
fn format_of(format: &Format, i: usize) -> FieldFormat {
    match format {
        Format::UnifiedText => FieldFormat::Text,
        Format::UnifiedBinary => FieldFormat::Binary,
        Format::Individual(codes) => codes
            .get(i)
            .map_or(FieldFormat::Text, |c| FieldFormat::from(*c)),
    }
}

/// The type of parameter `i`: as the client declared it, else text.
fn parameter_type(stmt: &StoredStatement<Prepared>, i: usize) -> Type {
    stmt.parameter_types
        .get(i)
        .cloned()
        .flatten()
        .unwrap_or(Type::TEXT)
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let text = |_: usize| FieldFormat::Text;
        if let Some(df) = self.recognized(query) {
            return Ok(vec![match rows(&df, &text) {
                Ok(r) => r,
                Err(e) => Response::Error(Box::new(e.into())),
            }]);
        }
        let statements = match statement::parse(query) {
            Ok(s) => s,
            Err(e) => return Ok(vec![Response::Error(Box::new(e.into()))]),
        };
        let mut responses = Vec::with_capacity(statements.len());
        for st in statements {
            let session = self.session(client);
            let result = match statement::classify(st, query, &*self.engine.catalog(), &session) {
                Ok(Kind::Select { params, .. }) if params > 0 => Err(SqlError::new(
                    "08P01",
                    format!(
                        "there is no parameter ${params} (parameters need the extended query protocol)"
                    ),
                )),
                Ok(kind) => self.run(client, kind, query, &text).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => responses.push(r),
                Err(e) => {
                    responses.push(Response::Error(Box::new(e.into())));
                    break;
                }
            }
        }
        if responses.is_empty() {
            responses.push(Response::EmptyQuery);
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Prepared;
    type QueryParser = Prepare;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let params = match &target.statement.statement {
            Some(st) => {
                let session = self.session(client);
                match statement::classify(
                    st.clone(),
                    &target.statement.sql,
                    &*self.engine.catalog(),
                    &session,
                )? {
                    Kind::Select { params, .. } => params,
                    _ => 0,
                }
            }
            None => 0,
        };
        let types: Vec<Type> = (0..params.max(target.parameter_types.len()))
            .map(|i| parameter_type(target, i))
            .collect();
        let fields = self
            .describe(client, &target.statement, &types, &|_| FieldFormat::Text)
            .await?;
        Ok(DescribeStatementResponse::new(types, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let types: Vec<Type> = (0..portal.parameter_len())
            .map(|i| parameter_type(&portal.statement, i))
            .collect();
        let format = portal.result_column_format.clone();
        let fields = self
            .describe(client, &portal.statement.statement, &types, &|i| {
                format_of(&format, i)
            })
            .await?;
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let format = portal.result_column_format.clone();
        let format = move |i: usize| format_of(&format, i);
        if let Some(df) = self.recognized(&prepared.sql) {
            return Ok(rows(&df, &format)?);
        }
        let Some(st) = prepared.statement.clone() else {
            return Ok(Response::EmptyQuery);
        };
        let session = self.session(client);
        let kind = match statement::classify(st, &prepared.sql, &*self.engine.catalog(), &session)?
        {
            Kind::Select {
                mut statement,
                tables,
                params,
            } => {
                let values = (0..params)
                    .map(|i| parameter(portal, i, &parameter_type(&portal.statement, i)))
                    .collect::<Result<Vec<_>, _>>()?;
                statement::bind(&mut statement, &values)?;
                Kind::Select {
                    statement,
                    tables,
                    params,
                }
            }
            other => other,
        };
        Ok(self.run(client, kind, &prepared.sql, &format).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_timeouts_parse_like_postgres() {
        assert_eq!(parse_timeout("5000"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("'5s'"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_timeout("soon"), None);
    }
}
