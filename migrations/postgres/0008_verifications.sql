-- Continuous verification (PostgreSQL). Kept in step with migrations/sqlite/0008_verifications.sql.

-- CRC-32 (IEEE) of a segment's Parquet bytes as written; NULL for segments sealed before it was
-- recorded. `verify` and compaction refuse a file whose bytes no longer match.
ALTER TABLE segments ADD COLUMN crc32 BIGINT;

-- One row per finished `verify` of a pipeline (a workflow's `verify` task or the command):
-- what it checked and what it found. `status`, `/metrics` and each answer's `as_of` show the
-- latest row and the latest successful one.
CREATE TABLE verifications (
    id          BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline    TEXT        NOT NULL,
    -- The workflow run of a `verify` task; NULL for `lambda-ctl verify`.
    run_id      BIGINT,
    ok          BOOLEAN     NOT NULL,
    segments    BIGINT      NOT NULL,
    events      BIGINT      NOT NULL,
    -- JSON list of the problems found (empty when ok).
    problems    TEXT        NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX verifications_by_pipeline ON verifications (pipeline, id);
