//! The groups of scaled-out batch runs (`batch::groups`): which have ended, where and how. The
//! group whose row completes its run's set queues the run's finish job.

use std::collections::BTreeMap;
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

impl State {
    /// Records that group `group` of batch run `run_id` ended as `end` says, unless it had
    /// ended already (a second delivery: the first outcome stays). Returns how many groups of
    /// the run have ended.
    pub async fn end_batch_group(
        &self,
        run_id: RunId,
        group: u32,
        end: &GroupEnd,
    ) -> Result<u32, StateError> {
        const INSERT: &str = "
            INSERT INTO batch_groups (run_id, grp, worker, ms, error) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (run_id, grp) DO NOTHING";
        const COUNT: &str = "SELECT COUNT(*) FROM batch_groups WHERE run_id = $1";
        let ms = to_db("group duration", end.took.as_millis() as u64)?;
        let ended: i64 = on_pool!(self, |pool| async {
            sqlx::query(INSERT)
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
        const SQL: &str = "SELECT COUNT(*) FROM batch_groups WHERE run_id = $1 AND grp = $2";
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
        const SQL: &str = "SELECT grp, worker, ms, error FROM batch_groups WHERE run_id = $1";
        let rows: Vec<(i64, String, i64, Option<String>)> =
            on_pool!(self, |pool| sqlx::query_as(SQL)
                .bind(run_id.0)
                .fetch_all(pool)
                .await)
            .map_err(db("read a run's batch groups"))?;
        rows.into_iter()
            .map(|(g, worker, ms, error)| {
                let end = GroupEnd {
                    worker,
                    took: Duration::from_millis(from_db("group duration", ms)?),
                    error,
                };
                Ok((from_db("batch group", g)?, end))
            })
            .collect()
    }
}
