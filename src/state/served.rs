//! What each view served from when: one row per install by a server's pickup (a publication,
//! or none at a server's start), at the instant ([`crate::clock::Tick`], as nanoseconds) the
//! server placed it. `as_of` answers read the row current at their instant; GC keeps what the
//! rows of `serve.history` refer to.

use super::{BeginWrite, Publication, PublicationId, State, StateError, db, now};

/// From instant `at_ns`, view `view` served `publication` (`None`: none — the speed layer
/// alone) computed by logic `logic_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub pipeline: String,
    pub view: String,
    pub at_ns: i64,
    pub publication: Option<PublicationId>,
    pub logic_hash: String,
}

impl State {
    /// Records installs; a row already recorded (same view and instant) is left as it is.
    pub async fn record_served(&self, rows: &[Install]) -> Result<(), StateError> {
        const SQL: &str = "
            INSERT INTO served (pipeline, view, at_ns, publication_id, logic_hash)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (pipeline, view, at_ns) DO NOTHING";
        on_pool!(self, |pool| {
            let mut tx = pool
                .begin_write()
                .await
                .map_err(db("record what was served"))?;
            for r in rows {
                sqlx::query(SQL)
                    .bind(&r.pipeline)
                    .bind(&r.view)
                    .bind(r.at_ns)
                    .bind(r.publication.map(|p| p.0))
                    .bind(&r.logic_hash)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("record what was served"))?;
            }
            tx.commit()
                .await
                .map_err(db("record what was served: commit"))?;
        });
        Ok(())
    }

    /// What `pipeline.view` served at instant `at_ns`: the latest install at or before it, with
    /// its publication; `None` when nothing was recorded by then.
    pub async fn served_at(
        &self,
        pipeline: &str,
        view: &str,
        at_ns: i64,
    ) -> Result<Option<(Install, Option<Publication>)>, StateError> {
        const SQL: &str = "
            SELECT at_ns, publication_id, logic_hash FROM served
            WHERE pipeline = $1 AND view = $2 AND at_ns <= $3
            ORDER BY at_ns DESC LIMIT 1";
        let row: Option<(i64, Option<i64>, String)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .bind(at_ns)
            .fetch_optional(pool)
            .await)
        .map_err(db("read what a view served"))?;
        let Some((at_ns, publication, logic_hash)) = row else {
            return Ok(None);
        };
        // Forgotten by retention of view history: the caller says it is gone.
        let found = match publication {
            None => None,
            Some(id) => self.publication(PublicationId(id)).await?,
        };
        let install = Install {
            pipeline: pipeline.to_string(),
            view: view.to_string(),
            at_ns,
            publication: publication.map(PublicationId),
            logic_hash,
        };
        Ok(Some((install, found)))
    }

    /// Installs of any view of `pipeline` at instants in `[from_ns, to_ns]` (each one takes a
    /// place among the events of its millisecond).
    pub async fn installs_between(
        &self,
        pipeline: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<u64, StateError> {
        const SQL: &str = "
            SELECT CAST(COUNT(*) AS BIGINT) FROM served
            WHERE pipeline = $1 AND at_ns >= $2 AND at_ns <= $3";
        let (n,): (i64,) = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(from_ns)
            .bind(to_ns)
            .fetch_one(pool)
            .await)
        .map_err(db("count installs"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The batch runs whose publications of `pipeline.view` were served at some instant since
    /// `since_ns` (the one current then included): what `as_of` answers within
    /// `serve.history` read, so GC keeps their files.
    pub async fn served_runs(
        &self,
        pipeline: &str,
        view: &str,
        since_ns: i64,
    ) -> Result<Vec<i64>, StateError> {
        const SQL: &str = "
            SELECT DISTINCT p.run_id FROM served s JOIN publications p ON p.id = s.publication_id
            WHERE s.pipeline = $1 AND s.view = $2
              AND s.at_ns >= COALESCE((SELECT MAX(at_ns) FROM served
                                       WHERE pipeline = $1 AND view = $2 AND at_ns <= $3), $3)
            ORDER BY p.run_id";
        let rows: Vec<(i64,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .bind(since_ns)
            .fetch_all(pool)
            .await)
        .map_err(db("read the runs of served publications"))?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    /// Forgets installs of `pipeline` before `before_ns` except each view's latest one before
    /// it (current at `before_ns`); returns how many rows went.
    pub async fn forget_served_before(
        &self,
        pipeline: &str,
        before_ns: i64,
    ) -> Result<u64, StateError> {
        const SQL: &str = "
            DELETE FROM served
            WHERE pipeline = $1 AND at_ns < $2
              AND at_ns < (SELECT MAX(s.at_ns) FROM served s
                           WHERE s.pipeline = served.pipeline AND s.view = served.view
                             AND s.at_ns < $2)";
        let done = on_pool!(self, |pool| sqlx::query(SQL)
            .bind(pipeline)
            .bind(before_ns)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .map_err(db("forget old installs"))?;
        Ok(done)
    }

    /// Records that view `view` of `pipeline` with logic `logic_hash` was defined by `spec` (its
    /// pipeline file's text); a definition already recorded is left as it is.
    pub async fn record_definition(
        &self,
        pipeline: &str,
        view: &str,
        logic_hash: &str,
        spec: &str,
    ) -> Result<(), StateError> {
        const SQL: &str = "
            INSERT INTO definitions (pipeline, view, logic_hash, spec, recorded_at_ms)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (pipeline, view, logic_hash) DO NOTHING";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(pipeline)
            .bind(view)
            .bind(logic_hash)
            .bind(spec)
            .bind(now().timestamp_millis())
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("record a view's definition"))
    }

    /// The pipeline file's text that defined view `view` of `pipeline` with logic
    /// `logic_hash`, if a server recorded it.
    pub async fn definition(
        &self,
        pipeline: &str,
        view: &str,
        logic_hash: &str,
    ) -> Result<Option<String>, StateError> {
        const SQL: &str = "
            SELECT spec FROM definitions WHERE pipeline = $1 AND view = $2 AND logic_hash = $3";
        let row: Option<(String,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .bind(logic_hash)
            .fetch_optional(pool)
            .await)
        .map_err(db("read a view's definition"))?;
        Ok(row.map(|(s,)| s))
    }
}
