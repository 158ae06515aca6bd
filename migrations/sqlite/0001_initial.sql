-- Initial state schema (SQLite). Kept in step with migrations/postgres/0001_initial.sql: same
-- tables, columns and constraints, each in the dialect's own types. Later changes are new files
-- in both directories; an applied file is never edited (sqlx checks its checksum).
--
-- STRICT tables, so a value of the wrong type is an error instead of being stored as-is.
-- Wall-clock times are RFC 3339 TEXT (how sqlx encodes chrono for SQLite).
-- Ids use AUTOINCREMENT: a run id appears in lake paths (views/.../run={id}/) and must never be
-- reused, even after the newest row is deleted.
-- Enum-like TEXT columns (state, kind) carry no CHECK constraint on purpose: SQLite cannot alter a
-- CHECK without rebuilding the table, so new values would not be an additive migration.

-- The archive manifest: one row per sealed Parquet segment [lo, hi) of a pipeline partition.
CREATE TABLE segments (
    pipeline     TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    lo           INTEGER NOT NULL,
    hi           INTEGER NOT NULL,
    path         TEXT    NOT NULL,
    row_count    INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    dead_letters INTEGER NOT NULL,
    min_event_ms INTEGER,
    max_event_ms INTEGER,
    created_at   TEXT    NOT NULL,
    PRIMARY KEY (pipeline, partition, lo),
    CHECK (partition >= 0 AND lo >= 0 AND lo < hi)
) STRICT;

-- Next position of each pipeline partition not yet sealed into a segment. Advanced in the same
-- transaction that inserts the segment row.
CREATE TABLE checkpoints (
    pipeline   TEXT    NOT NULL,
    partition  INTEGER NOT NULL,
    position   INTEGER NOT NULL CHECK (position >= 0),
    updated_at TEXT    NOT NULL,
    PRIMARY KEY (pipeline, partition)
) STRICT;

-- Rejected events per pipeline (the events themselves are in the lake). Counted when their
-- segment is sealed, so a replay after a crash does not count them twice.
CREATE TABLE dead_letters (
    pipeline   TEXT    PRIMARY KEY,
    total      INTEGER NOT NULL,
    updated_at TEXT    NOT NULL
) STRICT;

-- Workflow runs and batch runs.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    scheduled_at TEXT,
    created_at   TEXT    NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    error        TEXT,
    log          TEXT    NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX runs_by_name ON runs (name, id);

-- One row per attempt of a workflow task; retries are new rows with the next attempt number.
CREATE TABLE task_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       INTEGER NOT NULL REFERENCES runs (id),
    task         TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    state        TEXT    NOT NULL,
    scheduled_at TEXT,
    created_at   TEXT    NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    error        TEXT,
    log          TEXT    NOT NULL DEFAULT '',
    UNIQUE (run_id, task, attempt)
) STRICT;

-- Last cron slot of each workflow for which a run was created.
CREATE TABLE schedules (
    workflow   TEXT PRIMARY KEY,
    last_slot  TEXT NOT NULL,
    updated_at TEXT NOT NULL
) STRICT;

-- Every published version of a batch view; old versions stay until collected.
CREATE TABLE publications (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline     TEXT    NOT NULL,
    view         TEXT    NOT NULL,
    run_id       INTEGER NOT NULL REFERENCES runs (id),
    logic_hash   TEXT    NOT NULL,
    cutoff       TEXT    NOT NULL,
    row_count    INTEGER NOT NULL,
    published_at TEXT    NOT NULL
) STRICT;
CREATE INDEX publications_by_view ON publications (pipeline, view, id);

-- The version serving reads, one per view. A separate row (rather than a flag on publications)
-- makes "switch from version A to B" a single compare-and-set UPDATE.
CREATE TABLE current_publications (
    pipeline       TEXT    NOT NULL,
    view           TEXT    NOT NULL,
    publication_id INTEGER NOT NULL REFERENCES publications (id),
    PRIMARY KEY (pipeline, view)
) STRICT;
