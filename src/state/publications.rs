//! Published batch views (DESIGN.md §4): every version, and which one serving reads.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

use super::{BeginWrite, RunId, State, StateError, db, from_db, now, to_db};

/// Per partition, the first position a batch view does NOT cover; serving adds the speed
/// partials of positions at or after it.
pub type Cutoff = BTreeMap<u32, u64>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicationId(pub i64);

impl fmt::Display for PublicationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A view version a batch run wants to make current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPublication {
    pub pipeline: String,
    pub view: String,
    pub run_id: RunId,
    pub logic_hash: String,
    pub cutoff: Cutoff,
    pub rows: u64,
    /// The publication that was current when the run started (`None`: none was). Publishing
    /// succeeds only if it is still current, so an incremental result is never built on a
    /// version another run has already replaced.
    pub replaces: Option<PublicationId>,
    /// Windows that ended at or before this instant (epoch ms) are retired: left out of this
    /// version, and out of the speed layer's part of answers served with it (`retention`).
    pub horizon_ms: Option<i64>,
}

impl NewPublication {
    /// The version as recorded with `id` at `at`.
    pub(super) fn recorded(&self, id: PublicationId, at: DateTime<Utc>) -> Publication {
        Publication {
            id,
            pipeline: self.pipeline.clone(),
            view: self.view.clone(),
            run_id: self.run_id,
            logic_hash: self.logic_hash.clone(),
            cutoff: self.cutoff.clone(),
            rows: self.rows,
            published_at: at,
            horizon_ms: self.horizon_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub id: PublicationId,
    pub pipeline: String,
    pub view: String,
    pub run_id: RunId,
    pub logic_hash: String,
    pub cutoff: Cutoff,
    pub rows: u64,
    pub published_at: DateTime<Utc>,
    /// See [`NewPublication::horizon_ms`].
    pub horizon_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
pub(super) struct PublicationRow {
    id: i64,
    pipeline: String,
    view: String,
    run_id: i64,
    logic_hash: String,
    cutoff: String,
    row_count: i64,
    published_at: DateTime<Utc>,
    horizon_ms: Option<i64>,
}

impl PublicationRow {
    pub(super) fn into_publication(self) -> Result<Publication, StateError> {
        let cutoff = serde_json::from_str(&self.cutoff).map_err(|_| StateError::Corrupt {
            what: "publication cutoff",
            value: self.cutoff.clone(),
        })?;
        Ok(Publication {
            id: PublicationId(self.id),
            pipeline: self.pipeline,
            view: self.view,
            run_id: RunId(self.run_id),
            logic_hash: self.logic_hash,
            cutoff,
            rows: from_db("row count", self.row_count)?,
            published_at: self.published_at,
            horizon_ms: self.horizon_ms,
        })
    }
}

/// Binds [`INSERT`]'s parameters from a [`NewPublication`] (its cutoff as JSON, its rows as
/// the database's integer, the instant).
macro_rules! bind_version {
    ($query:expr, $new:expr, $cutoff:expr, $rows:expr, $at:expr) => {
        $query
            .bind(&$new.pipeline)
            .bind(&$new.view)
            .bind($new.run_id.0)
            .bind(&$new.logic_hash)
            .bind(&$cutoff)
            .bind($rows)
            .bind($at)
            .bind($new.horizon_ms)
    };
}
pub(super) use bind_version;

pub(super) const INSERT: &str = "
    INSERT INTO publications
        (pipeline, view, run_id, logic_hash, cutoff, row_count, published_at, horizon_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    RETURNING id";

/// First publication of a view: only if no other run made one current meanwhile.
pub(super) const MAKE_FIRST_CURRENT: &str = "
    INSERT INTO current_publications (pipeline, view, publication_id) VALUES ($1, $2, $3)
    ON CONFLICT (pipeline, view) DO NOTHING";

/// Compare-and-set from the version the run started from (`$4`) to the new one.
pub(super) const REPLACE_CURRENT: &str = "
    UPDATE current_publications SET publication_id = $3
    WHERE pipeline = $1 AND view = $2 AND publication_id = $4";

pub(super) const SELECT_CURRENT_ID: &str =
    "SELECT publication_id FROM current_publications WHERE pipeline = $1 AND view = $2";

/// In transaction `$tx`: makes publication `$new` (an id) current for `$pipeline.$view` if
/// `$expected` (`Option<PublicationId>`; `None`: none is) is still current, else returns
/// [`StateError::PublicationRaced`] from the enclosing block, recording nothing. `$what` names
/// the operation in errors. The compare-and-set of publish and promote.
macro_rules! switch_current {
    ($tx:expr, $pipeline:expr, $view:expr, $new:expr, $expected:expr, $what:literal) => {{
        let switched = match $expected {
            None => {
                sqlx::query($crate::state::publications::MAKE_FIRST_CURRENT)
                    .bind($pipeline)
                    .bind($view)
                    .bind($new)
                    .execute(&mut *$tx)
                    .await
            }
            Some(old) => {
                sqlx::query($crate::state::publications::REPLACE_CURRENT)
                    .bind($pipeline)
                    .bind($view)
                    .bind($new)
                    .bind(old.0)
                    .execute(&mut *$tx)
                    .await
            }
        }
        .map_err(db(concat!($what, ": switch current version")))?
        .rows_affected();
        if switched == 0 {
            let found: Option<(i64,)> =
                sqlx::query_as($crate::state::publications::SELECT_CURRENT_ID)
                    .bind($pipeline)
                    .bind($view)
                    .fetch_optional(&mut *$tx)
                    .await
                    .map_err(db(concat!($what, ": read current version")))?;
            let show = |id: Option<i64>| id.map_or_else(|| "none".into(), |i| i.to_string());
            return Err(StateError::PublicationRaced {
                pipeline: $pipeline.to_string(),
                view: $view.to_string(),
                expected: show($expected.map(|p: PublicationId| p.0)),
                found: show(found.map(|(i,)| i)),
            });
        }
    }};
}
pub(super) use switch_current;

impl State {
    /// Records a view version and makes it current, in one transaction: serving switches
    /// atomically, and a run that fails before this publishes nothing.
    ///
    /// Fails with [`StateError::PublicationRaced`] (recording nothing) when the current version
    /// is no longer `replaces`.
    pub async fn publish(&self, new: &NewPublication) -> Result<Publication, StateError> {
        // Integer keys and values: serialising this map cannot fail.
        let cutoff = serde_json::to_string(&new.cutoff).expect("a map of integers serialises");
        let rows = to_db("row count", new.rows)?;
        let at = now();
        let id = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("publish"))?;
            let (id,): (i64,) = bind_version!(sqlx::query_as(INSERT), new, cutoff, rows, at)
                .fetch_one(&mut *tx)
                .await
                .map_err(db("publish: insert version"))?;
            switch_current!(tx, &new.pipeline, &new.view, id, new.replaces, "publish");
            tx.commit().await.map_err(db("publish: commit"))?;
            id
        });
        tracing::info!(
            pipeline = %new.pipeline, view = %new.view, run = new.run_id.0, publication = id,
            rows = new.rows, "published view"
        );
        Ok(new.recorded(PublicationId(id), at))
    }

    /// The version of `pipeline.view` serving reads; `None` before its first publish.
    pub async fn current_publication(
        &self,
        pipeline: &str,
        view: &str,
    ) -> Result<Option<Publication>, StateError> {
        const SQL: &str = "
            SELECT p.id, p.pipeline, p.view, p.run_id, p.logic_hash, p.cutoff, p.row_count,
                   p.published_at, p.horizon_ms
            FROM current_publications c JOIN publications p ON p.id = c.publication_id
            WHERE c.pipeline = $1 AND c.view = $2";
        let row: Option<PublicationRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .fetch_optional(pool)
            .await)
        .map_err(db("read current publication"))?;
        row.map(PublicationRow::into_publication).transpose()
    }

    /// Version `id`; `None` when retention forgot it.
    pub async fn publication(&self, id: PublicationId) -> Result<Option<Publication>, StateError> {
        const SQL: &str = "
            SELECT id, pipeline, view, run_id, logic_hash, cutoff, row_count, published_at,
                   horizon_ms
            FROM publications WHERE id = $1";
        let row: Option<PublicationRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(id.0)
            .fetch_optional(pool)
            .await)
        .map_err(db("read a publication"))?;
        row.map(PublicationRow::into_publication).transpose()
    }

    /// The views run `run_id` published, in the order it published them.
    pub async fn run_publications(&self, run_id: RunId) -> Result<Vec<Publication>, StateError> {
        const SQL: &str = "
            SELECT id, pipeline, view, run_id, logic_hash, cutoff, row_count, published_at,
                   horizon_ms
            FROM publications WHERE run_id = $1 ORDER BY id";
        let rows: Vec<PublicationRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(run_id.0)
            .fetch_all(pool)
            .await)
        .map_err(db("read a run's publications"))?;
        rows.into_iter()
            .map(PublicationRow::into_publication)
            .collect()
    }

    /// Retention of view history: forgets every version of `pipeline.view` published before
    /// `before` except the current one; returns the runs whose files the caller may delete
    /// (those no remaining version refers to).
    pub async fn drop_publications_before(
        &self,
        pipeline: &str,
        view: &str,
        before: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StateError> {
        const DELETE: &str = "
            DELETE FROM publications
            WHERE pipeline = $1 AND view = $2 AND published_at < $3
              AND id NOT IN (SELECT publication_id FROM current_publications
                             WHERE pipeline = $1 AND view = $2)
            RETURNING run_id";
        const STILL_USED: &str =
            "SELECT DISTINCT run_id FROM publications WHERE pipeline = $1 AND view = $2";
        let (dropped, used): (Vec<(i64,)>, Vec<(i64,)>) = on_pool!(self, |pool| {
            let mut tx = pool
                .begin_write()
                .await
                .map_err(db("drop old publications"))?;
            let dropped = sqlx::query_as(DELETE)
                .bind(pipeline)
                .bind(view)
                .bind(before)
                .fetch_all(&mut *tx)
                .await
                .map_err(db("drop old publications"))?;
            let used = sqlx::query_as(STILL_USED)
                .bind(pipeline)
                .bind(view)
                .fetch_all(&mut *tx)
                .await
                .map_err(db("drop old publications: runs still used"))?;
            tx.commit()
                .await
                .map_err(db("drop old publications: commit"))?;
            (dropped, used)
        });
        let used: std::collections::BTreeSet<i64> = used.into_iter().map(|(r,)| r).collect();
        let mut runs: Vec<RunId> = dropped
            .into_iter()
            .map(|(r,)| r)
            .filter(|r| !used.contains(r))
            .map(RunId)
            .collect();
        runs.sort_by_key(|r| r.0);
        runs.dedup();
        Ok(runs)
    }
}
