-- Initial state schema (PostgreSQL). Kept in step with migrations/sqlite/0001_initial.sql:
-- same tables, columns and constraints, each in the dialect's own types. Later changes are new
-- files in both directories; an applied file is never edited (sqlx checks its checksum).
--
-- Positions, counts and event times are BIGINT (i64 in Rust). Wall-clock times are TIMESTAMPTZ.
-- Enum-like TEXT columns (state, kind) carry no CHECK constraint on purpose: SQLite cannot alter a
-- CHECK without rebuilding the table, so new values would not be an additive migration.

-- The archive manifest: one row per sealed Parquet segment [lo, hi) of a pipeline partition.
CREATE TABLE segments (
    pipeline     TEXT        NOT NULL,
    partition    BIGINT      NOT NULL,
    lo           BIGINT      NOT NULL,
    hi           BIGINT      NOT NULL,
    path         TEXT        NOT NULL,
    row_count    BIGINT      NOT NULL,
    bytes        BIGINT      NOT NULL,
    dead_letters BIGINT      NOT NULL,
    min_event_ms BIGINT,
    max_event_ms BIGINT,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline, partition, lo),
    CHECK (partition >= 0 AND lo >= 0 AND lo < hi)
);

-- Next position of each pipeline partition not yet sealed into a segment. Advanced in the same
-- transaction that inserts the segment row.
CREATE TABLE checkpoints (
    pipeline   TEXT        NOT NULL,
    partition  BIGINT      NOT NULL,
    position   BIGINT      NOT NULL CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline, partition)
);

-- Rejected events per pipeline (the events themselves are in the lake). Counted when their
-- segment is sealed, so a replay after a crash does not count them twice.
CREATE TABLE dead_letters (
    pipeline   TEXT        PRIMARY KEY,
    total      BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Workflow runs and batch runs. The id appears in lake paths (views/.../run={id}/), so it is
-- never reused.
CREATE TABLE runs (
    id           BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         TEXT        NOT NULL,
    name         TEXT        NOT NULL,
    state        TEXT        NOT NULL,
    scheduled_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    error        TEXT,
    log          TEXT        NOT NULL DEFAULT ''
);
CREATE INDEX runs_by_name ON runs (name, id);

-- One row per attempt of a workflow task; retries are new rows with the next attempt number.
CREATE TABLE task_attempts (
    id           BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       BIGINT      NOT NULL REFERENCES runs (id),
    task         TEXT        NOT NULL,
    attempt      BIGINT      NOT NULL,
    state        TEXT        NOT NULL,
    scheduled_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    error        TEXT,
    log          TEXT        NOT NULL DEFAULT '',
    UNIQUE (run_id, task, attempt)
);

-- Last cron slot of each workflow for which a run was created.
CREATE TABLE schedules (
    workflow   TEXT        PRIMARY KEY,
    last_slot  TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Every published version of a batch view; old versions stay until collected.
CREATE TABLE publications (
    id           BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline     TEXT        NOT NULL,
    view         TEXT        NOT NULL,
    run_id       BIGINT      NOT NULL REFERENCES runs (id),
    logic_hash   TEXT        NOT NULL,
    cutoff       TEXT        NOT NULL,
    row_count    BIGINT      NOT NULL,
    published_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX publications_by_view ON publications (pipeline, view, id);

-- The version serving reads, one per view. A separate row (rather than a flag on publications)
-- makes "switch from version A to B" a single compare-and-set UPDATE.
CREATE TABLE current_publications (
    pipeline       TEXT   NOT NULL,
    view           TEXT   NOT NULL,
    publication_id BIGINT NOT NULL REFERENCES publications (id),
    PRIMARY KEY (pipeline, view)
);
