//! The `postgres` sink: a table with one row per (window_start, group keys) of the view,
//! columns typed `timestamptz`, `float8`, `int8`, `text`, `bool`.
//!
//! The table is created if missing, with `UNIQUE NULLS NOT DISTINCT (window_start, keys…)`
//! as its key: the all-time window's window_start is null and a group may be null, and a
//! plain primary key allows neither (so creating needs PostgreSQL 15). An existing table must
//! have every column of the view with exactly its type, and a unique key on exactly those
//! columns that treats nulls as equal (or whose columns are NOT NULL); otherwise the sink
//! refuses to start and names the column.
//!
//! A delivery is ONE transaction: bump the sink's row in `lambda_sink_progress` (same schema
//! as the table) from the sequence number this process last saw to the next, with the
//! answer's `as_of`; delete the vanished keys; upsert the changed rows. The sequence number is
//! the fence: if the table changed behind this process's back (another writer, or a commit
//! whose answer was lost with the connection), the bump matches no row, the transaction rolls
//! back, and the sink reads the table back before trying again. At start the table is read
//! back too, so a restart after `kill -9` continues from exactly what was committed.
//!
//! This speaks SQL to a user's database, not to the state DB, which is why it is here and not
//! in `state`.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Row};

use super::rows::{Cell, Kind, Rows, Shape};
use super::{Delivery, Holding, SinkError, Target};
use crate::spec::pipeline::PROGRESS_TABLE;
use crate::state::redact;

/// How long taking a connection may wait before the database counts as unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per statement (each column is one array parameter).
const CHUNK: usize = 5_000;
/// Serializes the sinks' table checks and creations across processes (one transaction-scoped
/// advisory lock): two sinks creating their tables at once would otherwise race on the
/// catalog.
const DDL_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('lambda-ctl sink tables'))";

pub struct PostgresTarget {
    url: String,
    /// As written in the spec: the key of the sink's progress row.
    name: String,
    /// `PIPELINE.VIEW`, recorded in the progress row.
    view: String,
    /// Quoted, with its schema if given.
    table: String,
    /// Quoted `lambda_sink_progress`, in the table's schema.
    progress: String,
    shape: Shape,
    /// Statements of this table, built once.
    upsert: String,
    delete: String,
    select: String,
    pool: Option<PgPool>,
    /// The progress sequence number of the table as this process last knew it (read back or
    /// committed); `None` before the first open. Protects against writing over changes this
    /// process has not seen.
    seq: Option<i64>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The type a column of `kind` is created with, and the name `format_type` gives it.
fn pg_type(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Time => ("timestamptz", "timestamp with time zone"),
        Kind::Float => ("float8", "double precision"),
        Kind::Int => ("int8", "bigint"),
        Kind::Text => ("text", "text"),
        Kind::Bool => ("bool", "boolean"),
    }
}

impl PostgresTarget {
    pub fn new(url: &str, table: &str, view: &str, shape: Shape) -> PostgresTarget {
        let (schema, name) = match table.split_once('.') {
            Some((s, t)) => (Some(s), t),
            None => (None, table),
        };
        let in_schema = |t: &str| match schema {
            Some(s) => format!("{}.{}", quote(s), quote(t)),
            None => quote(t),
        };
        let quoted = in_schema(name);
        let cols: Vec<String> = shape.columns.iter().map(|(c, _)| quote(c)).collect();
        let keys: Vec<String> = shape.key_names().map(quote).collect();
        let arrays: Vec<String> = shape
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, k))| format!("${}::{}[]", i + 1, pg_type(*k).0))
            .collect();
        let updates: Vec<String> = shape
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !shape.key.contains(i))
            .map(|(_, (c, _))| format!("{0} = EXCLUDED.{0}", quote(c)))
            .collect();
        let upsert = format!(
            "INSERT INTO {quoted} ({}) SELECT * FROM UNNEST({}) ON CONFLICT ({}) DO UPDATE SET {}",
            cols.join(", "),
            arrays.join(", "),
            keys.join(", "),
            updates.join(", ")
        );
        let key_arrays: Vec<String> = shape
            .key
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("${}::{}[]", n + 1, pg_type(shape.columns[i].1).0))
            .collect();
        // window_start is null only in the all-time window: elsewhere `=` lets the index help.
        let matches: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(n, k)| {
                if n == 0 && !shape.all_time {
                    format!("t.{k} = d.{k}")
                } else {
                    format!("t.{k} IS NOT DISTINCT FROM d.{k}")
                }
            })
            .collect();
        let delete = format!(
            "DELETE FROM {quoted} AS t USING UNNEST({}) AS d({}) WHERE {}",
            key_arrays.join(", "),
            keys.join(", "),
            matches.join(" AND ")
        );
        let select = format!("SELECT {} FROM {quoted}", cols.join(", "));
        PostgresTarget {
            url: url.to_string(),
            name: table.to_string(),
            view: view.to_string(),
            table: quoted,
            progress: in_schema(PROGRESS_TABLE),
            shape,
            upsert,
            delete,
            select,
            pool: None,
            seq: None,
        }
    }

    async fn pool(&mut self) -> Result<PgPool, SinkError> {
        if let Some(p) = &self.pool {
            return Ok(p.clone());
        }
        let options = PgConnectOptions::from_str(&self.url)
            .map_err(|e| {
                SinkError::Config(format!("invalid postgres url {}: {e}", redact(&self.url)))
            })?
            .application_name("lambda-ctl sink");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| failed(format!("connecting to {}", redact(&self.url)), e))?;
        self.pool = Some(pool.clone());
        Ok(pool)
    }

    /// Creates the progress table and the sink's table if missing, checks an existing one,
    /// makes sure the progress row exists. One transaction under [`DDL_LOCK`].
    async fn prepare(&self, pool: &PgPool) -> Result<(), SinkError> {
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| failed("starting a transaction", e))?;
        sqlx::query(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("taking the sink table lock", e))?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (sink text PRIMARY KEY, view text NOT NULL, \
             seq int8 NOT NULL, as_of jsonb, rows int8 NOT NULL DEFAULT 0, \
             updated_at timestamptz NOT NULL DEFAULT now())",
            self.progress
        )))
        .execute(&mut *tx)
        .await
        .map_err(|e| failed(format!("creating {}", self.progress), e))?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&self.table)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| failed(format!("looking up table {}", self.table), e))?;
        if exists {
            self.check_columns(&mut tx).await?;
            self.check_key(&mut tx).await?;
        } else {
            self.create(&mut tx).await?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (sink, view, seq) VALUES ($1, $2, 0) ON CONFLICT (sink) DO NOTHING",
            self.progress
        )))
        .bind(&self.name)
        .bind(&self.view)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("recording the sink's progress row", e))?;
        tx.commit()
            .await
            .map_err(|e| failed("committing the table check", e))
    }

    async fn create(&self, tx: &mut sqlx::PgConnection) -> Result<(), SinkError> {
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int4")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| failed("reading the server version", e))?;
        let keys: Vec<String> = self.shape.key_names().map(quote).collect();
        if version < 150_000 {
            return Err(SinkError::Config(format!(
                "table {} does not exist, and creating it needs PostgreSQL 15 or newer (its key holds nulls: UNIQUE NULLS NOT DISTINCT); create it yourself with every column of the view and a unique key on ({})",
                self.table,
                keys.join(", ")
            )));
        }
        let cols: Vec<String> = self
            .shape
            .columns
            .iter()
            .map(|(c, k)| format!("{} {}", quote(c), pg_type(*k).0))
            .collect();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {} ({}, UNIQUE NULLS NOT DISTINCT ({}))",
            self.table,
            cols.join(", "),
            keys.join(", ")
        )))
        .execute(&mut *tx)
        .await
        .map_err(|e| failed(format!("creating table {}", self.table), e))?;
        tracing::info!(table = %self.table, view = %self.view, "created the sink table");
        Ok(())
    }

    /// Every column of the view, with its exact type; no other column the inserts would fail on.
    async fn check_columns(&self, tx: &mut sqlx::PgConnection) -> Result<(), SinkError> {
        let found: Vec<(String, String, bool, bool)> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind(&self.table)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed(format!("reading the columns of {}", self.table), e))?;
        let t = &self.table;
        let fix = "or drop the table to have lambda-ctl create it";
        for (i, (name, kind)) in self.shape.columns.iter().enumerate() {
            let (create, expected) = pg_type(*kind);
            let Some((_, ty, not_null, _)) = found.iter().find(|(n, ..)| n == name) else {
                return Err(SinkError::Config(format!(
                    "table {t} has no column `{name}` ({expected}) of the view: ALTER TABLE {t} ADD COLUMN {} {create}, {fix}",
                    quote(name)
                )));
            };
            if ty != expected {
                return Err(SinkError::Config(format!(
                    "column `{name}` of table {t} is {ty}, but the view's `{name}` is {expected}: change the column's type, {fix}"
                )));
            }
            // Only the window bounds of a windowed view are never null.
            let nullable = i >= 2 || self.shape.all_time;
            if *not_null && nullable {
                return Err(SinkError::Config(format!(
                    "column `{name}` of table {t} is NOT NULL, but the view's `{name}` can be null: ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL, {fix}",
                    quote(name)
                )));
            }
        }
        for (name, _, not_null, has_default) in &found {
            if *not_null && !has_default && !self.shape.columns.iter().any(|(c, _)| c == name) {
                return Err(SinkError::Config(format!(
                    "column `{name}` of table {t} is not a column of the view and is NOT NULL without a default, so no row could be inserted: give it a default, drop it, {fix}"
                )));
            }
        }
        Ok(())
    }

    /// A unique key on exactly (window_start, group keys) for `ON CONFLICT`, under which
    /// null keys are equal (a primary key, NULLS NOT DISTINCT, or NOT NULL columns).
    async fn check_key(&self, tx: &mut sqlx::PgConnection) -> Result<(), SinkError> {
        let indexes: Vec<(bool, bool, Vec<String>)> = sqlx::query_as(
            "SELECT i.indisprimary, \
             coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false), \
             ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) AS k(n) \
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n \
                   ORDER BY a.attname) \
             FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisunique \
             AND i.indpred IS NULL AND i.indexprs IS NULL",
        )
        .bind(&self.table)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed(format!("reading the indexes of {}", self.table), e))?;
        let not_null: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = to_regclass($1) \
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull",
        )
        .bind(&self.table)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed(format!("reading the columns of {}", self.table), e))?;
        let mut want: Vec<String> = self.shape.key_names().map(str::to_string).collect();
        want.sort();
        let usable = indexes.iter().any(|(primary, nulls_equal, cols)| {
            *cols == want && (*primary || *nulls_equal || want.iter().all(|c| not_null.contains(c)))
        });
        if usable {
            return Ok(());
        }
        let keys: Vec<String> = self.shape.key_names().map(quote).collect();
        Err(SinkError::Config(format!(
            "table {t} has no unique key on exactly ({k}) that treats nulls as equal, which the upserts need: ALTER TABLE {t} ADD UNIQUE NULLS NOT DISTINCT ({k}), or drop the table to have lambda-ctl create it",
            t = self.table,
            k = keys.join(", ")
        )))
    }

    /// The progress sequence number and every row, from one snapshot.
    async fn read_back(&self, pool: &PgPool) -> Result<(i64, Rows), SinkError> {
        let mut tx = pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| failed("starting a read transaction", e))?;
        let seq: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT seq FROM {} WHERE sink = $1",
            self.progress
        )))
        .bind(&self.name)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| failed("reading the sink's progress", e))?;
        let mut rows = Rows::new();
        {
            let mut stream = sqlx::query(AssertSqlSafe(self.select.clone())).fetch(&mut *tx);
            while let Some(r) = stream
                .try_next()
                .await
                .map_err(|e| failed(format!("reading back {}", self.table), e))?
            {
                let row = self.decode(&r)?;
                rows.insert(self.shape.key_of(&row), row);
            }
        }
        tx.commit()
            .await
            .map_err(|e| failed("ending the read transaction", e))?;
        Ok((seq, rows))
    }

    fn decode(&self, r: &PgRow) -> Result<Vec<Cell>, SinkError> {
        let mut row = Vec::with_capacity(self.shape.columns.len());
        for (i, (name, kind)) in self.shape.columns.iter().enumerate() {
            let bad = |e: sqlx::Error| failed(format!("reading column `{name}` back"), e);
            row.push(match kind {
                Kind::Time => r
                    .try_get::<Option<DateTime<Utc>>, _>(i)
                    .map_err(bad)?
                    .map_or(Cell::Null, |t| Cell::Time(t.timestamp_millis())),
                Kind::Float => r
                    .try_get::<Option<f64>, _>(i)
                    .map_err(bad)?
                    .map_or(Cell::Null, Cell::float),
                Kind::Int => r
                    .try_get::<Option<i64>, _>(i)
                    .map_err(bad)?
                    .map_or(Cell::Null, Cell::Int),
                Kind::Text => r
                    .try_get::<Option<String>, _>(i)
                    .map_err(bad)?
                    .map_or(Cell::Null, Cell::Text),
                Kind::Bool => r
                    .try_get::<Option<bool>, _>(i)
                    .map_err(bad)?
                    .map_or(Cell::Null, Cell::Bool),
            });
        }
        Ok(row)
    }
}

/// `query` with one array parameter per column of `columns` (positions into each row).
fn bind_columns<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    shape: &Shape,
    columns: &[usize],
    rows: &[&[Cell]],
) -> Query<'q, Postgres, PgArguments> {
    for &i in columns {
        let cells = rows.iter().map(|r| &r[i]);
        query = match shape.columns[i].1 {
            Kind::Time => query.bind(
                cells
                    .map(|c| match c {
                        Cell::Time(ms) => DateTime::<Utc>::from_timestamp_millis(*ms),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Float => query.bind(
                cells
                    .map(|c| match c {
                        Cell::Float(f) => Some(*f),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Int => query.bind(
                cells
                    .map(|c| match c {
                        Cell::Int(v) => Some(*v),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Text => query.bind(
                cells
                    .map(|c| match c {
                        Cell::Text(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            Kind::Bool => query.bind(
                cells
                    .map(|c| match c {
                        Cell::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
        };
    }
    query
}

fn failed(what: impl std::fmt::Display, e: sqlx::Error) -> SinkError {
    SinkError::Failed(anyhow::anyhow!("{what}: {e}"))
}

#[async_trait]
impl Target for PostgresTarget {
    async fn open(&mut self) -> Result<Holding, SinkError> {
        let pool = self.pool().await?;
        self.prepare(&pool).await?;
        if let Some(seq) = self.seq {
            let now: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT seq FROM {} WHERE sink = $1",
                self.progress
            )))
            .bind(&self.name)
            .fetch_one(&pool)
            .await
            .map_err(|e| failed("reading the sink's progress", e))?;
            if now == seq {
                return Ok(Holding::Same);
            }
        }
        let (seq, rows) = self.read_back(&pool).await?;
        self.seq = Some(seq);
        Ok(Holding::Rows(rows))
    }

    async fn apply(&mut self, delivery: &Delivery<'_>) -> Result<(), SinkError> {
        let seq = self
            .seq
            .ok_or_else(|| anyhow::anyhow!("the sink table was not opened"))?;
        let pool = self.pool().await?;
        let as_of = serde_json::to_string(delivery.as_of)
            .map_err(|e| anyhow::anyhow!("encoding as_of: {e}"))?;
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| failed("starting a transaction", e))?;
        let bumped = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET seq = seq + 1, as_of = $2::jsonb, rows = $3, updated_at = now() \
             WHERE sink = $1 AND seq = $4",
            self.progress
        )))
        .bind(&self.name)
        .bind(&as_of)
        .bind(delivery.rows.len() as i64)
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("recording the sink's progress", e))?;
        if bumped.rows_affected() != 1 {
            // Dropping `tx` rolls back.
            return Err(SinkError::Failed(anyhow::anyhow!(
                "table {} changed since this process last read it (progress {seq} is gone); reading it back",
                self.table
            )));
        }
        let key: Vec<usize> = (0..self.shape.key.len()).collect();
        for chunk in delivery.diff.deletes.chunks(CHUNK) {
            let keys: Vec<&[Cell]> = chunk.iter().map(Vec::as_slice).collect();
            let key_shape = Shape {
                columns: self
                    .shape
                    .key
                    .iter()
                    .map(|&i| self.shape.columns[i].clone())
                    .collect(),
                key: key.clone(),
                all_time: self.shape.all_time,
            };
            let q = sqlx::query(AssertSqlSafe(self.delete.clone()));
            bind_columns(q, &key_shape, &key, &keys)
                .execute(&mut *tx)
                .await
                .map_err(|e| failed(format!("deleting from {}", self.table), e))?;
        }
        let all: Vec<usize> = (0..self.shape.columns.len()).collect();
        for chunk in delivery.diff.upserts.chunks(CHUNK) {
            let rows: Vec<&[Cell]> = chunk.iter().map(Vec::as_slice).collect();
            let q = sqlx::query(AssertSqlSafe(self.upsert.clone()));
            bind_columns(q, &self.shape, &all, &rows)
                .execute(&mut *tx)
                .await
                .map_err(|e| failed(format!("upserting into {}", self.table), e))?;
        }
        tx.commit()
            .await
            .map_err(|e| failed(format!("committing to {}", self.table), e))?;
        self.seq = Some(seq + 1);
        Ok(())
    }

    /// One small transaction bumping the progress row: cheap, and the row then says which
    /// batch publication the table reflects.
    fn records_progress_alone(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(all_time: bool) -> Shape {
        Shape {
            columns: vec![
                ("window_start".into(), Kind::Time),
                ("window_end".into(), Kind::Time),
                ("page".into(), Kind::Text),
                ("views".into(), Kind::Int),
            ],
            key: vec![0, 2],
            all_time,
        }
    }

    #[test]
    fn statements_upsert_by_window_and_group_and_match_null_keys() {
        let t = PostgresTarget::new(
            "postgres://h/db",
            "bi.page_views",
            "clicks.pv",
            shape(false),
        );
        assert_eq!(t.table, "\"bi\".\"page_views\"");
        assert_eq!(t.progress, "\"bi\".\"lambda_sink_progress\"");
        assert_eq!(
            t.upsert,
            "INSERT INTO \"bi\".\"page_views\" (\"window_start\", \"window_end\", \"page\", \"views\") \
             SELECT * FROM UNNEST($1::timestamptz[], $2::timestamptz[], $3::text[], $4::int8[]) \
             ON CONFLICT (\"window_start\", \"page\") DO UPDATE SET \"window_end\" = EXCLUDED.\"window_end\", \"views\" = EXCLUDED.\"views\""
        );
        assert_eq!(
            t.delete,
            "DELETE FROM \"bi\".\"page_views\" AS t USING UNNEST($1::timestamptz[], $2::text[]) AS d(\"window_start\", \"page\") \
             WHERE t.\"window_start\" = d.\"window_start\" AND t.\"page\" IS NOT DISTINCT FROM d.\"page\""
        );
        // The all-time window's start is null: matched as such.
        let all = PostgresTarget::new("postgres://h/db", "totals", "clicks.t", shape(true));
        assert!(
            all.delete
                .contains("t.\"window_start\" IS NOT DISTINCT FROM d.\"window_start\"")
        );
        assert_eq!(all.progress, "\"lambda_sink_progress\"");
    }
}
