//! Candidate view versions (blue/green): computed by an edited definition beside the live
//! version, recorded as publications that are not current.

use super::publications::{INSERT, PublicationRow, bind_version, switch_current};
use super::{
    BeginWrite, NewPublication, Publication, PublicationId, State, StateError, db, now, to_db,
};

/// A view's candidate version and the live one it was computed beside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub publication: Publication,
    /// The publication current when the candidate was computed (`None`: none was).
    pub live: Option<PublicationId>,
    pub created_at_ms: i64,
}

/// The candidates and their publications, for `concat!` with a condition.
macro_rules! select {
    () => {
        "SELECT p.id, p.pipeline, p.view, p.run_id, p.logic_hash, p.cutoff, p.row_count,
                p.published_at, p.horizon_ms, c.live_id, c.created_at_ms
         FROM candidates c JOIN publications p ON p.id = c.publication_id"
    };
}

#[derive(sqlx::FromRow)]
struct CandidateRow {
    #[sqlx(flatten)]
    publication: PublicationRow,
    live_id: Option<i64>,
    created_at_ms: i64,
}

impl CandidateRow {
    fn into_candidate(self) -> Result<Candidate, StateError> {
        Ok(Candidate {
            publication: self.publication.into_publication()?,
            live: self.live_id.map(PublicationId),
            created_at_ms: self.created_at_ms,
        })
    }
}

impl State {
    /// Records `new` as the candidate version of its view (replacing an earlier candidate),
    /// beside `new.replaces` (the live version); nothing current changes. One transaction.
    pub async fn publish_candidate(&self, new: &NewPublication) -> Result<Publication, StateError> {
        const UPSERT: &str = "
            INSERT INTO candidates (pipeline, view, publication_id, live_id, created_at_ms)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (pipeline, view) DO UPDATE
            SET publication_id = excluded.publication_id, live_id = excluded.live_id,
                created_at_ms = excluded.created_at_ms";
        let cutoff = serde_json::to_string(&new.cutoff).expect("a map of integers serialises");
        let rows = to_db("row count", new.rows)?;
        let at = now();
        let id = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("record a candidate"))?;
            let (id,): (i64,) = bind_version!(sqlx::query_as(INSERT), new, cutoff, rows, at)
                .fetch_one(&mut *tx)
                .await
                .map_err(db("record a candidate: insert version"))?;
            sqlx::query(UPSERT)
                .bind(&new.pipeline)
                .bind(&new.view)
                .bind(id)
                .bind(new.replaces.map(|p| p.0))
                .bind(at.timestamp_millis())
                .execute(&mut *tx)
                .await
                .map_err(db("record a candidate"))?;
            tx.commit()
                .await
                .map_err(db("record a candidate: commit"))?;
            id
        });
        tracing::info!(
            pipeline = %new.pipeline, view = %new.view, run = new.run_id.0, publication = id,
            rows = new.rows, "recorded candidate view version"
        );
        Ok(new.recorded(PublicationId(id), at))
    }

    /// The candidate version of `pipeline.view`, if there is one.
    pub async fn candidate(
        &self,
        pipeline: &str,
        view: &str,
    ) -> Result<Option<Candidate>, StateError> {
        const SQL: &str = concat!(select!(), " WHERE c.pipeline = $1 AND c.view = $2");
        let row: Option<CandidateRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .bind(view)
            .fetch_optional(pool)
            .await)
        .map_err(db("read a candidate"))?;
        row.map(CandidateRow::into_candidate).transpose()
    }

    /// Every candidate version of `pipeline`'s views, by view name.
    pub async fn candidates(&self, pipeline: &str) -> Result<Vec<Candidate>, StateError> {
        const SQL: &str = concat!(select!(), " WHERE c.pipeline = $1 ORDER BY c.view");
        let rows: Vec<CandidateRow> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(pipeline)
            .fetch_all(pool)
            .await)
        .map_err(db("read candidates"))?;
        rows.into_iter().map(CandidateRow::into_candidate).collect()
    }

    /// Promotes: makes each `(view, expected, new)` of `pipeline` current — `new` replacing
    /// `expected` (`None`: the view had none) — and forgets the pipeline's candidates, in one
    /// transaction, so a reader sees every view switched or none. Fails with
    /// [`StateError::PublicationRaced`], changing nothing, when a view's current version is no
    /// longer `expected` (a batch run published meanwhile).
    pub async fn promote(
        &self,
        pipeline: &str,
        switches: &[(String, Option<PublicationId>, PublicationId)],
    ) -> Result<(), StateError> {
        const DELETE: &str = "DELETE FROM candidates WHERE pipeline = $1";
        on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await.map_err(db("promote"))?;
            for (view, expected, new) in switches {
                if *expected == Some(*new) {
                    continue;
                }
                switch_current!(tx, pipeline, view.as_str(), new.0, *expected, "promote");
            }
            sqlx::query(DELETE)
                .bind(pipeline)
                .execute(&mut *tx)
                .await
                .map_err(db("promote: forget the candidates"))?;
            tx.commit().await.map_err(db("promote: commit"))?;
        });
        tracing::info!(%pipeline, views = switches.len(), "promoted view versions");
        Ok(())
    }

    /// Forgets `pipeline`'s candidates; returns them (their files are GC's once a run
    /// collects: no candidate refers to them any more).
    pub async fn discard_candidates(&self, pipeline: &str) -> Result<Vec<Candidate>, StateError> {
        const DELETE: &str = "DELETE FROM candidates WHERE pipeline = $1";
        let found = self.candidates(pipeline).await?;
        on_pool!(self, |pool| sqlx::query(DELETE)
            .bind(pipeline)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("discard candidates"))?;
        Ok(found)
    }
}
