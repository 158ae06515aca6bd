//! The groups of scaled-out batch runs (`batch::groups`): which have ended, and how. The
//! group whose row completes its run's set queues the run's finish job.

use std::collections::BTreeMap;

use super::{RunId, State, StateError, db, from_db};

impl State {
    /// Records that group `group` of batch run `run_id` ended — its partials are in the lake
    /// (`error` `None`) or it could not be computed — unless it had ended already (a second
    /// delivery: the first outcome stays). Returns how many groups of the run have ended.
    pub async fn end_batch_group(
        &self,
        run_id: RunId,
        group: u32,
        error: Option<&str>,
    ) -> Result<u32, StateError> {
        const INSERT: &str = "
            INSERT INTO batch_groups (run_id, grp, error) VALUES ($1, $2, $3)
            ON CONFLICT (run_id, grp) DO NOTHING";
        const COUNT: &str = "SELECT COUNT(*) FROM batch_groups WHERE run_id = $1";
        let ended: i64 = on_pool!(self, |pool| async {
            sqlx::query(INSERT)
                .bind(run_id.0)
                .bind(i64::from(group))
                .bind(error)
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

    /// The groups of batch run `run_id` that have ended, each with its error if it failed.
    pub async fn batch_groups(
        &self,
        run_id: RunId,
    ) -> Result<BTreeMap<u32, Option<String>>, StateError> {
        const SQL: &str = "SELECT grp, error FROM batch_groups WHERE run_id = $1";
        let rows: Vec<(i64, Option<String>)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(run_id.0)
            .fetch_all(pool)
            .await)
        .map_err(db("read a run's batch groups"))?;
        rows.into_iter()
            .map(|(g, error)| Ok((from_db("batch group", g)?, error)))
            .collect()
    }
}
