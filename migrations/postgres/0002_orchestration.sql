-- Orchestration (PostgreSQL). Kept in step with migrations/sqlite/0002_orchestration.sql.

-- A running attempt's worker refreshes this while it executes the task; an attempt whose
-- heartbeat stops (its process died) is failed as lost and retried, instead of staying
-- `running` forever.
ALTER TABLE task_attempts ADD COLUMN heartbeat_at TIMESTAMPTZ;

-- One row per workflow, written first by every transaction that changes the workflow's runs
-- (admission, finishing attempts, retries). The row lock serialises those transactions per
-- workflow, so `max_active_runs` and "start a task once all its needs succeeded" hold when
-- several workers finish tasks of the same workflow at the same moment.
CREATE TABLE workflow_locks (
    workflow  TEXT        PRIMARY KEY,
    locked_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX runs_by_state ON runs (name, state, id);
CREATE INDEX task_attempts_by_state ON task_attempts (state, run_id);
