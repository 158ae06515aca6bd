//! SQL for BI tools: every view as a table `PIPELINE.VIEW` over the PostgreSQL wire protocol
//! (`serve.sql` in lambda.yaml), for Grafana, Power BI, psql and any PostgreSQL driver.
//!
//! - [`handler`]: the protocol (through `pgwire`): startup and SCRAM-SHA-256 with
//!   `serve.token` as the password, simple and extended query (prepared statements, binds).
//! - [`statement`]: parsing, classifying (read-only: writes are refused) and rewriting a
//!   statement for polars SQL.
//! - [`engine`]: running it over the views' answers under the HTTP API's snapshot and row
//!   index, with the statement timeout and row limit.
//! - [`catalog`]: `information_schema`, `pg_catalog` and the queries of psql and Grafana.
//! - [`types`]: result columns as PostgreSQL types and values.

pub mod catalog;
pub mod engine;
pub mod handler;
pub mod statement;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use pgwire::error::{ErrorInfo, PgWireError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use engine::Engine;

/// Connections open at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Statements running at once; the others wait (their wait counts toward the timeout).
pub const MAX_RUNNING: usize = 32;

/// An error answered to the client as an ErrorResponse; the connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    /// SQLSTATE.
    pub code: &'static str,
    pub message: String,
    /// 1-based character position in the statement's text.
    pub position: Option<usize>,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError {
            code,
            message: message.into(),
            position: None,
        }
    }

    /// With `position`, unless it has one already.
    pub fn at(mut self, position: Option<usize>) -> SqlError {
        if self.position.is_none() {
            self.position = position;
        }
        self
    }
}

impl From<SqlError> for ErrorInfo {
    fn from(e: SqlError) -> ErrorInfo {
        let mut info = ErrorInfo::new("ERROR".to_string(), e.code.to_string(), e.message);
        info.position = e.position.map(|p| p.to_string());
        info
    }
}

impl From<SqlError> for PgWireError {
    fn from(e: SqlError) -> PgWireError {
        PgWireError::UserError(Box::new(e.into()))
    }
}

/// What `version()` answers.
pub fn version() -> String {
    format!(
        "PostgreSQL 16.6 (lambda-ctl {}: views over the PostgreSQL wire protocol, read-only)",
        env!("CARGO_PKG_VERSION")
    )
}

/// The value `SHOW name` and `current_setting('name')` answer; `None` for an unknown name.
pub fn setting(name: &str) -> Option<String> {
    Some(
        match name {
            "server_version" => "16.6",
            "server_version_num" => "160006",
            "server_encoding" | "client_encoding" => "UTF8",
            "timezone" => "UTC",
            "datestyle" => "ISO, MDY",
            "intervalstyle" => "postgres",
            "search_path" => "\"$user\", public",
            "standard_conforming_strings" => "on",
            "integer_datetimes" => "on",
            "transaction_isolation" | "default_transaction_isolation" => "read committed",
            "transaction_read_only" | "default_transaction_read_only" => "on",
            "max_identifier_length" => "63",
            "lc_collate" | "lc_ctype" => "C",
            "is_superuser" => "off",
            "application_name" => "",
            "extra_float_digits" => "1",
            _ => return None,
        }
        .to_string(),
    )
}

/// Serves `engine` on `listener` until `shutdown` is cancelled; open connections end with it.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handlers = Arc::new(handler::Handlers::new(engine));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an SQL connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let handlers = handlers.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = pgwire::tokio::process_socket(stream, None, handlers) => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "SQL connection ended");
                    }
                }
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}
