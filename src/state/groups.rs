//! The groups of scaled-out batch runs (`batch::scaleout`): which have started, which have ended,
//! where and how. The group whose end completes its run's set queues the run's finish job.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{RunId, State, StateError, db, from_db, to_db};

/// How one group of a scaled-out batch run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEnd {
    /// The worker that computed it (`lambda-ctl-worker:PID`, …).
    pub worker: String,
    pub took: Duration,
    /// Why it could not be computed; `None` when its partials are in the lake.
    pub error: Option<String>,
}

/// How far a scaled-out batch run's groups have come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupProgress {
    /// Groups a worker has taken (ended ones included).
    pub started: u32,
    pub ended: BTreeSet<u32>,
}

impl State {
    /// Records that `worker` has taken group `group` of batch run `run_id` (a no-op when it was
    /// taken before: a second delivery).
    pub async fn start_batch_group(
        &self,
        run_id: RunId,
        group: u32,
        worker: &str,
    ) -> Result<(), StateError> {
        const SQL: &str = "
            INSERT INTO batch_groups (run_id, grp, worker) VALUES ($1, $2, $3)
            ON CONFLICT (run_id, grp) DO NOTHING";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(run_id.0)
            .bind(i64::from(group))
            .bind(worker)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(db("record the start of a batch group"))?;
        Ok(())
    }

    /// Records that group `group` of batch run `run_id` ended as `end` says, unless it had
    /// ended already (a second delivery: the first outcome stays). Returns how many groups of
    /// the run have ended.
    pub async fn end_batch_group(
        &self,
        run_id: RunId,
        group: u32,
        end: &GroupEnd,
    ) -> Result<u32, StateError> {
        const UPSERT: &str = "
            INSERT INTO batch_groups (run_id, grp, worker, ms, error) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (run_id, grp) DO UPDATE
            SET worker = excluded.worker, ms = excluded.ms, error = excluded.error
            WHERE batch_groups.ms IS NULL";
        const COUNT: &str =
            "SELECT COUNT(*) FROM batch_groups WHERE run_id = $1 AND ms IS NOT NULL";
        let ms = to_db("group duration", end.took.as_millis() as u64)?;
        let ended: i64 = on_pool!(self, |pool| async {
            sqlx::query(UPSERT)
                .bind(run_id.0)
                .bind(i64::from(group))
                .bind(&end.worker)
                .bind(ms)
                .bind(end.error.as_deref())
                .execute(pool)
                .await?;
            sqlx::query_scalar(COUNT)
                .bind(run_id.0)
                .fetch_one(pool)
                .await
        }
        .await)
        .map_err(db("record the end of a batch group"))?;
        from_db("ended batch groups", ended)
    }

    /// Whether group `group` of batch run `run_id` has ended.
    pub async fn batch_group_ended(&self, run_id: RunId, group: u32) -> Result<bool, StateError> {
        const SQL: &str = "
            SELECT COUNT(*) FROM batch_groups WHERE run_id = $1 AND grp = $2 AND ms IS NOT NULL";
        let n: i64 = on_pool!(self, |pool| sqlx::query_scalar(SQL)
            .bind(run_id.0)
            .bind(i64::from(group))
            .fetch_one(pool)
            .await)
        .map_err(db("read a batch group"))?;
        Ok(n > 0)
    }

    /// The groups of batch run `run_id` that have ended, by number.
    pub async fn batch_groups(&self, run_id: RunId) -> Result<BTreeMap<u32, GroupEnd>, StateError> {
        const SQL: &str = "
            SELECT grp, worker, ms, error FROM batch_groups
            WHERE run_id = $1 AND ms IS NOT NULL";
        let rows: Vec<(i64, String, Option<i64>, Option<String>)> =
            on_pool!(self, |pool| sqlx::query_as(SQL)
                .bind(run_id.0)
                .fetch_all(pool)
                .await)
            .map_err(db("read a run's batch groups"))?;
        rows.into_iter()
            .map(|(g, worker, ms, error)| {
                let end = GroupEnd {
                    worker,
                    took: Duration::from_millis(from_db("group duration", ms.unwrap_or(0))?),
                    error,
                };
                Ok((from_db("batch group", g)?, end))
            })
            .collect()
    }

    /// How many groups of batch run `run_id` have been taken, and which have ended.
    pub async fn batch_group_progress(&self, run_id: RunId) -> Result<GroupProgress, StateError> {
        const SQL: &str = "SELECT grp, ms FROM batch_groups WHERE run_id = $1";
        let rows: Vec<(i64, Option<i64>)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(run_id.0)
            .fetch_all(pool)
            .await)
        .map_err(db("read a run's batch groups"))?;
        let mut progress = GroupProgress {
            started: from_db("batch groups", rows.len() as i64)?,
            ended: BTreeSet::new(),
        };
        for (g, ms) in rows {
            if ms.is_some() {
                progress.ended.insert(from_db("batch group", g)?);
            }
        }
        Ok(progress)
    }
}
