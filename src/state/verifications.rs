//! Results of `verify` (a workflow's `verify` task, `lambda-ctl verify`): one row per finished
//! check of a pipeline, read back as the latest result and the latest success for `status`,
//! `/metrics` and each answer's `as_of`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{RunId, State, StateError, db, from_db, now, to_db};

/// A finished check, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub pipeline: String,
    /// The workflow run of a `verify` task; `None` for `lambda-ctl verify`.
    pub run_id: Option<RunId>,
    pub ok: bool,
    /// Sealed segments checked, and their events.
    pub segments: u64,
    pub events: u64,
    /// What was found wrong (empty when `ok`).
    pub problems: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A pipeline's latest check and when one last succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyStatus {
    pub last: Verification,
    pub last_success: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct VerificationRow {
    pipeline: String,
    run_id: Option<i64>,
    ok: bool,
    segments: i64,
    events: i64,
    problems: String,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    last_success: Option<DateTime<Utc>>,
}

impl VerificationRow {
    fn into_status(self) -> Result<VerifyStatus, StateError> {
        let problems = serde_json::from_str(&self.problems).map_err(|_| StateError::Corrupt {
            what: "verification problems",
            value: self.problems.clone(),
        })?;
        Ok(VerifyStatus {
            last: Verification {
                pipeline: self.pipeline,
                run_id: self.run_id.map(RunId),
                ok: self.ok,
                segments: from_db("segment count", self.segments)?,
                events: from_db("event count", self.events)?,
                problems,
                started_at: self.started_at,
                finished_at: self.finished_at,
            },
            last_success: self.last_success,
        })
    }
}

/// The latest row per pipeline with the latest successful one's finish time (`$1`: one
/// pipeline's, or NULL for every pipeline's).
const LATEST: &str = "
    SELECT v.pipeline, v.run_id, v.ok, v.segments, v.events, v.problems, v.started_at,
           v.finished_at,
           (SELECT MAX(s.finished_at) FROM verifications s
            WHERE s.pipeline = v.pipeline AND s.ok) AS last_success
    FROM verifications v
    WHERE v.id = (SELECT MAX(l.id) FROM verifications l WHERE l.pipeline = v.pipeline)
      AND ($1 IS NULL OR v.pipeline = $1)";

impl State {
    /// Records a finished check (its finish time is now).
    pub async fn record_verification(
        &self,
        pipeline: &str,
        run_id: Option<RunId>,
        segments: u64,
        events: u64,
        problems: &[String],
        started_at: DateTime<Utc>,
    ) -> Result<Verification, StateError> {
        const SQL: &str = "INSERT INTO verifications
            (pipeline, run_id, ok, segments, events, problems, started_at, finished_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        let v = Verification {
            pipeline: pipeline.to_string(),
            run_id,
            ok: problems.is_empty(),
            segments,
            events,
            problems: problems.to_vec(),
            started_at,
            finished_at: now(),
        };
        let problems = serde_json::to_string(&v.problems).expect("strings serialize");
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(&v.pipeline)
            .bind(v.run_id.map(|r| r.0))
            .bind(v.ok)
            .bind(to_db("segment count", v.segments)?)
            .bind(to_db("event count", v.events)?)
            .bind(&problems)
            .bind(v.started_at)
            .bind(v.finished_at)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("record verification"))?;
        Ok(v)
    }

    /// The latest check of `pipeline`, if it was ever checked.
    pub async fn verify_status(&self, pipeline: &str) -> Result<Option<VerifyStatus>, StateError> {
        let row: Option<VerificationRow> = on_pool!(self, |pool| sqlx::query_as(LATEST)
            .bind(Some(pipeline))
            .fetch_optional(pool)
            .await)
        .map_err(db("read verification"))?;
        row.map(VerificationRow::into_status).transpose()
    }

    /// The latest check of every pipeline that was ever checked.
    pub async fn verify_statuses(&self) -> Result<BTreeMap<String, VerifyStatus>, StateError> {
        let rows: Vec<VerificationRow> = on_pool!(self, |pool| sqlx::query_as(LATEST)
            .bind(None::<&str>)
            .fetch_all(pool)
            .await)
        .map_err(db("read verifications"))?;
        rows.into_iter()
            .map(|r| Ok((r.pipeline.clone(), r.into_status()?)))
            .collect()
    }
}
