-- Scaled-out batch runs (PostgreSQL). Kept in step with migrations/sqlite/0004_batch_groups.sql.

-- The groups of a scaled-out batch run: a row when a worker starts one (ms NULL), completed
-- when it ends — its partials in the lake (error NULL), or the reason it could not be
-- computed. The group that completes the run's set queues the finish job; a group delivered
-- again after it ended is skipped. The run's process helps when nothing moves here.
CREATE TABLE batch_groups (
    run_id BIGINT  NOT NULL,
    grp    BIGINT  NOT NULL,
    -- The worker that took it (then: that ended it), and how long it took in milliseconds.
    worker TEXT    NOT NULL,
    ms     BIGINT,
    error  TEXT,
    PRIMARY KEY (run_id, grp)
);
