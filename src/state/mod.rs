//! The state database: the archive manifest and checkpoints, published batch views, runs and
//! schedules. Every SQL statement and migration of the project lives in this module.
//!
//! One [`State`] type over either a SQLite file (the embedded default) or PostgreSQL (several
//! processes on one state). It is an enum over the two concrete sqlx pools rather than sqlx's
//! `Any` driver, so each backend keeps its own types (TIMESTAMPTZ, identity columns) and
//! transactions.
//!
//! **Migrations** are two directories, `migrations/sqlite` and `migrations/postgres`, embedded
//! with `sqlx::migrate!` and run by [`State::open`]. Two sets instead of one portable file
//! because the dialects disagree exactly where the schema matters: generated ids (`GENERATED
//! ALWAYS AS IDENTITY` vs `AUTOINCREMENT`, which SQLite needs so a run id is never reused),
//! timestamps (`TIMESTAMPTZ` vs RFC 3339 text) and SQLite's `STRICT` tables. Both sets must
//! describe the same tables and columns with the same version numbers; a unit test checks the
//! versions, and the behaviour tests in `tests/it/state.rs` run against both backends.
//!
//! **Queries** are written once: `$N` placeholders (SQLite accepts them too) and statements both
//! dialects share (`ON CONFLICT … DO UPDATE … WHERE`, `RETURNING`). [`on_pool!`] compiles each
//! query body once per backend.
//!
//! **Write transactions start with a write.** In WAL mode a SQLite transaction that reads first
//! and writes later fails with `SQLITE_BUSY_SNAPSHOT` if another writer committed in between,
//! and the busy timeout cannot help. Starting with the write takes the write lock up front.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tracing::info;

/// Runs `$body` with `$pool` bound to the concrete pool of `$state`; the body is compiled once
/// per backend, so one SQL text and one Rust body serve both.
macro_rules! on_pool {
    ($state:expr, |$pool:ident| $body:expr) => {
        match &$state.db {
            $crate::state::Db::Sqlite($pool) => $body,
            $crate::state::Db::Postgres($pool) => $body,
        }
    };
}

mod archive;
mod candidates;
mod covered;
mod groups;
mod leases;
mod ledger;
mod publications;
mod runs;
mod schedules;
mod served;
mod stats;
mod verifications;
mod workflows;

pub use archive::{RetiredObject, Segment};
pub use candidates::Candidate;
pub use covered::is_covered;
pub use groups::{GroupEnd, GroupProgress};
pub use leases::{Fence, Lease, Node};
pub use ledger::{Cause, LedgerEntry, LedgerTotals};
pub use publications::{Cutoff, NewPublication, Publication, PublicationId};
pub use runs::{AttemptId, Outcome, Run, RunId, RunKind, RunState, TaskAttempt};
pub use served::Install;
pub use stats::{AttemptFigure, RunCount};
pub use verifications::{Verification, VerifyStatus};
pub use workflows::{
    Advanced, SchedulerLock, WorkflowAttempt, WorkflowChange, WorkflowEvent, WorkflowSnapshot,
};

/// Begins a transaction that writes. On SQLite it takes the write lock at `BEGIN IMMEDIATE`:
/// a deferred transaction that reads before it writes fails at once with "database is locked"
/// when another connection committed since its read — the busy timeout waits for a lock,
/// never for a stale snapshot. PostgreSQL's transactions need no such care.
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>;
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// A writer waits this long for another writer's lock (SQLite) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per process. SQLite serialises writers anyway; readers run in parallel in WAL.
const MAX_CONNECTIONS: u32 = 8;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "unsupported state URL `{0}` (use sqlite:///ABSOLUTE/PATH/state.db or postgres://USER@HOST/DB)"
    )]
    UnsupportedUrl(String),
    #[error("cannot create the directory {dir} for the state database: {source}")]
    CreateDir { dir: String, source: std::io::Error },
    #[error("cannot open the state database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error(
        "cannot migrate the state database {url}: {source} (was it written by a newer lambda-ctl?)"
    )]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("state database: {op}: {source}")]
    Db {
        op: &'static str,
        source: sqlx::Error,
    },
    #[error(
        "{what} {value} is out of range for the state database (at most {})",
        i64::MAX
    )]
    OutOfRange { what: &'static str, value: u64 },
    #[error("the state database holds an invalid {what}: `{value}`")]
    Corrupt { what: &'static str, value: String },
    #[error(
        "segment {pipeline}/p={partition} [{lo}, {hi}) is empty or reversed: a segment holds at least one position"
    )]
    EmptySegment {
        pipeline: String,
        partition: u32,
        lo: u64,
        hi: u64,
    },
    /// A segment holds one row per position of `[lo, hi)`: fewer would archive a range with
    /// events missing (and let the log below it go), more would count events twice.
    #[error(
        "segment {pipeline}/p={partition} [{lo}, {hi}) holds {rows} rows, not one per position ({}); refusing to archive it",
        hi - lo
    )]
    IncompleteSegment {
        pipeline: String,
        partition: u32,
        lo: u64,
        hi: u64,
        rows: u64,
    },
    /// Sealing `[lo, hi)` requires the partition's checkpoint to be exactly `lo`. Anything else
    /// means another archiver sealed this range or positions were skipped; the caller must not
    /// acknowledge upstream.
    #[error(
        "segment {pipeline}/p={partition} starting at {lo} does not follow the checkpoint {checkpoint}: another archiver sealed this range, or positions were skipped"
    )]
    NotContiguous {
        pipeline: String,
        partition: u32,
        lo: u64,
        checkpoint: u64,
    },
    /// A fenced seal ([`State::seal_segment_fenced`]) whose node no longer holds the
    /// partition's lease at its epoch: another node took the partition over and ingests it from
    /// the last recorded segment. Nothing was recorded; the caller must not acknowledge
    /// upstream, and must stop ingesting the partition.
    #[error(
        "partition {partition} of {pipeline} is no longer leased to node {node} (epoch {epoch}): another node took it over; this node's segment is not recorded"
    )]
    Fenced {
        pipeline: String,
        partition: u32,
        node: String,
        epoch: u64,
    },
    /// The view's current publication is not the one this publish meant to replace: another
    /// run published first. Nothing was published.
    #[error(
        "view {pipeline}.{view} was published by another run meanwhile (expected current {expected}, found {found}); nothing was published"
    )]
    PublicationRaced {
        pipeline: String,
        view: String,
        expected: String,
        found: String,
    },
    /// A manifest change (compaction, retention) found a segment it meant to replace already
    /// gone or changed: another process changed the archive meanwhile. Nothing was changed.
    #[error(
        "the archive of {pipeline} changed meanwhile (segment p={partition} at {lo} is gone); nothing was changed"
    )]
    ArchiveRaced {
        pipeline: String,
        partition: u32,
        lo: u64,
    },
    #[error("run {0} does not exist")]
    RunNotFound(RunId),
    #[error("task attempt {0} does not exist")]
    AttemptNotFound(AttemptId),
    /// A lifecycle step that does not apply to the current state, e.g. finishing a run twice.
    #[error("{what} {id} is {state}, cannot {action}")]
    WrongState {
        what: &'static str,
        id: i64,
        state: RunState,
        action: &'static str,
    },
}

/// Maps a sqlx error to [`StateError::Db`] naming the operation that failed.
fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StateError {
    move |source| StateError::Db { op, source }
}

/// Positions and counts are `u64` in Rust and BIGINT in the database.
fn to_db(what: &'static str, value: u64) -> Result<i64, StateError> {
    i64::try_from(value).map_err(|_| StateError::OutOfRange { what, value })
}

fn from_db<T: TryFrom<i64>>(what: &'static str, value: i64) -> Result<T, StateError> {
    T::try_from(value).map_err(|_| StateError::Corrupt {
        what,
        value: value.to_string(),
    })
}

/// Wall-clock time for the database, truncated to microseconds: PostgreSQL keeps no more, so a
/// value reads back equal on both backends.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The state database; cheap to clone (the pools are shared).
#[derive(Clone)]
pub struct State {
    db: Db,
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The pool under a [`State`], for the job queue only: apalis keeps its own tables in the state
/// database and speaks to them itself (wrapped in `orchestration`).
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("backend", &self.backend())
            .finish()
    }
}

impl State {
    /// Opens the state database at `url` (the `state` of `lambda.yaml`) and brings its schema up
    /// to date.
    ///
    /// - `sqlite:///abs/path/state.db`: creates the parent directories and the file; WAL journal
    ///   (readers never block the writer), `synchronous = FULL` (a sealed segment's manifest row
    ///   survives power loss before the source is acknowledged), a busy timeout for writers.
    ///   `sqlite::memory:` gives a private in-memory database (tests).
    /// - `postgres://user@host/db`: the database must exist.
    pub async fn open(url: &str) -> Result<State, StateError> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Db::Postgres(open_postgres(url).await?)
        } else if url.starts_with("sqlite:") {
            Db::Sqlite(open_sqlite(url).await?)
        } else {
            return Err(StateError::UnsupportedUrl(redact(url)));
        };
        let migrated = match &db {
            Db::Sqlite(pool) => sqlx::migrate!("migrations/sqlite").run(pool).await,
            Db::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await,
        };
        let state = State { db };
        migrated.map_err(|source| StateError::Migrate {
            url: redact(url),
            source,
        })?;
        info!(backend = state.backend(), url = %redact(url), "opened state database");
        Ok(state)
    }

    /// `"sqlite"` or `"postgres"`, for logs and status output.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// The underlying pool; see [`Pool`].
    pub fn pool(&self) -> Pool {
        match &self.db {
            Db::Sqlite(pool) => Pool::Sqlite(pool.clone()),
            Db::Postgres(pool) => Pool::Postgres(pool.clone()),
        }
    }

    /// Closes every connection; waits for queries in flight. Clones become unusable.
    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}

async fn open_postgres(url: &str) -> Result<PgPool, StateError> {
    let open = |source| StateError::Open {
        url: redact(url),
        source,
    };
    let options = PgConnectOptions::from_str(url).map_err(open)?;
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(open)
}

async fn open_sqlite(url: &str) -> Result<SqlitePool, StateError> {
    let open = |source| StateError::Open {
        url: url.to_string(),
        source,
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(open)?
        .create_if_missing(true)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    let (pool, options) = if is_sqlite_memory(url) {
        // An in-memory database lives as long as one connection to it: keep exactly one, forever.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        (pool, options)
    } else {
        let dir = options.get_filename().parent();
        if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        (
            SqlitePoolOptions::new().max_connections(MAX_CONNECTIONS),
            options,
        )
    };
    pool.acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(open)
}

fn create_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
        dir: dir.display().to_string(),
        source,
    })
}

fn is_sqlite_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory")
}

/// The URL with any password replaced, for messages and logs.
/// A URL without its password (state, lake or broker URLs), for logs and messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one, excluded above.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(dir: &str) -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .expect("migration directory exists")
            .map(|e| {
                e.expect("readable entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn both_backends_have_the_same_migrations() {
        let sqlite = versions("sqlite");
        assert!(!sqlite.is_empty());
        assert_eq!(sqlite, versions("postgres"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cret@db.example:5432/lambda"),
            "postgres://app:***@db.example:5432/lambda"
        );
        assert_eq!(
            redact("postgres://app@db.example/lambda"),
            "postgres://app@db.example/lambda"
        );
    }

    #[test]
    fn in_memory_urls_are_recognised() {
        assert!(is_sqlite_memory("sqlite::memory:"));
        assert!(is_sqlite_memory("sqlite://:memory:"));
        assert!(is_sqlite_memory("sqlite://x.db?mode=memory"));
        assert!(!is_sqlite_memory("sqlite:///tmp/memory/state.db"));
    }

    #[tokio::test]
    async fn sqlite_file_is_created_with_parents_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a/b/state.db");
        let state = State::open(&format!("sqlite://{}", file.display()))
            .await
            .expect("opens");
        assert!(file.is_file());
        let Db::Sqlite(pool) = &state.db else {
            panic!("a sqlite URL opens a sqlite pool")
        };
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(mode, "wal");
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(sync, 2, "synchronous = FULL");
        state.close().await;
    }

    #[tokio::test]
    async fn in_memory_database_keeps_its_schema() {
        let state = State::open("sqlite::memory:").await.expect("opens");
        // A second query may use another pooled connection; with one kept connection it sees
        // the migrated schema.
        assert_eq!(state.checkpoint("clicks", 0).await.expect("query"), None);
        assert_eq!(state.checkpoint("clicks", 1).await.expect("query"), None);
    }

    #[tokio::test]
    async fn unsupported_urls_are_rejected() {
        let err = State::open("mysql://root@localhost/lambda")
            .await
            .expect_err("mysql is not supported");
        assert!(matches!(err, StateError::UnsupportedUrl(_)), "{err}");
        assert!(err.to_string().contains("sqlite:///"), "{err}");
    }
}
