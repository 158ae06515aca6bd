//! Schedule slots (DESIGN.md §6): fire times come from the database, never from memory alone,
//! so a restarted or second scheduler neither loses nor repeats a slot.

use chrono::{DateTime, SubsecRound, Utc};

use super::runs::{INSERT_RUN, RunRow};
use super::{BeginWrite, Run, RunKind, RunState, State, StateError, db, now};

/// The first slot of a workflow: only if no scheduler recorded one meanwhile.
const CLAIM_FIRST: &str = "
    INSERT INTO schedules (workflow, last_slot, updated_at) VALUES ($1, $2, $3)
    ON CONFLICT (workflow) DO NOTHING";

/// Compare-and-set from the slot the scheduler last saw (`$4`).
const CLAIM_NEXT: &str = "
    UPDATE schedules SET last_slot = $2, updated_at = $3 WHERE workflow = $1 AND last_slot = $4";

impl State {
    /// Slots in `[from, to]` for which `workflow` already has a run that succeeded or is still
    /// queued or running (a backfill leaves those alone and re-runs failed or cancelled ones).
    pub async fn covered_slots(
        &self,
        workflow: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, StateError> {
        const SQL: &str = "
            SELECT DISTINCT scheduled_at FROM runs
            WHERE kind = $1 AND name = $2 AND scheduled_at >= $3 AND scheduled_at <= $4
              AND state IN ($5, $6, $7)";
        let rows: Vec<(DateTime<Utc>,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(RunKind::Workflow.as_str())
            .bind(workflow)
            .bind(from.trunc_subsecs(6))
            .bind(to)
            .bind(RunState::Queued.as_str())
            .bind(RunState::Running.as_str())
            .bind(RunState::Succeeded.as_str())
            .fetch_all(pool)
            .await)
        .map_err(db("list scheduled runs"))?;
        Ok(rows.into_iter().map(|(s,)| s).collect())
    }

    /// The last slot of `workflow` that got a run; `None` if it never fired.
    pub async fn last_slot(&self, workflow: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        const SQL: &str = "SELECT last_slot FROM schedules WHERE workflow = $1";
        let slot: Option<(DateTime<Utc>,)> = on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(workflow)
            .fetch_optional(pool)
            .await)
        .map_err(db("read schedule"))?;
        Ok(slot.map(|(s,)| s))
    }

    /// Records `slot` as the last slot of `workflow` and creates its queued run, in one
    /// transaction — provided the last slot is still `previous` (what [`State::last_slot`]
    /// returned). Returns `None`, changing nothing, when another scheduler got there first.
    ///
    /// Times are kept to the microsecond (PostgreSQL's precision), on both backends.
    pub async fn claim_slot(
        &self,
        workflow: &str,
        previous: Option<DateTime<Utc>>,
        slot: DateTime<Utc>,
    ) -> Result<Option<Run>, StateError> {
        let slot = slot.trunc_subsecs(6);
        let at = now();
        let row: Option<RunRow> = on_pool!(self, |pool| {
            let mut tx = pool
                .begin_write()
                .await
                .map_err(db("claim schedule slot"))?;
            let claimed = match previous {
                None => {
                    sqlx::query(CLAIM_FIRST)
                        .bind(workflow)
                        .bind(slot)
                        .bind(at)
                        .execute(&mut *tx)
                        .await
                }
                Some(previous) => {
                    sqlx::query(CLAIM_NEXT)
                        .bind(workflow)
                        .bind(slot)
                        .bind(at)
                        .bind(previous.trunc_subsecs(6))
                        .execute(&mut *tx)
                        .await
                }
            }
            .map_err(db("claim schedule slot"))?
            .rows_affected();
            if claimed == 0 {
                None
            } else {
                let row: RunRow = sqlx::query_as(INSERT_RUN)
                    .bind(RunKind::Workflow.as_str())
                    .bind(workflow)
                    .bind(Some(slot))
                    .bind(at)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("claim schedule slot: create run"))?;
                tx.commit()
                    .await
                    .map_err(db("claim schedule slot: commit"))?;
                Some(row)
            }
        });
        row.map(RunRow::into_run).transpose()
    }
}
