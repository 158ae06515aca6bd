-- Scaled-out batch runs (SQLite). Kept in step with migrations/postgres/0004_batch_groups.sql.

-- The groups of a scaled-out batch run that have ended: a row once the group's partials are in
-- the lake (error NULL), or with the reason it could not be computed. The group whose row
-- completes the run's set queues the finish job; a group delivered again is skipped.
CREATE TABLE batch_groups (
    run_id INTEGER NOT NULL,
    grp    INTEGER NOT NULL,
    -- The worker that computed it and how long that took (milliseconds).
    worker TEXT    NOT NULL,
    ms     INTEGER NOT NULL,
    error  TEXT,
    PRIMARY KEY (run_id, grp)
) STRICT;
