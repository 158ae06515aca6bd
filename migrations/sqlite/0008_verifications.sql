-- Continuous verification (SQLite). Kept in step with migrations/postgres/0008_verifications.sql.

-- CRC-32 (IEEE) of a segment's Parquet bytes as written; NULL for segments sealed before it was
-- recorded. `verify` and compaction refuse a file whose bytes no longer match.
ALTER TABLE segments ADD COLUMN crc32 INTEGER;

-- One row per finished `verify` of a pipeline (a workflow's `verify` task or the command):
-- what it checked and what it found. `status`, `/metrics` and each answer's `as_of` show the
-- latest row and the latest successful one.
CREATE TABLE verifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline    TEXT    NOT NULL,
    -- The workflow run of a `verify` task; NULL for `lambda-ctl verify`.
    run_id      INTEGER,
    ok          INTEGER NOT NULL,
    segments    INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    -- JSON list of the problems found (empty when ok).
    problems    TEXT    NOT NULL,
    started_at  TEXT    NOT NULL,
    finished_at TEXT    NOT NULL
) STRICT;
CREATE INDEX verifications_by_pipeline ON verifications (pipeline, id);
