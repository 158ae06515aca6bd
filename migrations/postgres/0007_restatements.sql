-- Restated history (PostgreSQL). Kept in step with migrations/sqlite/0007_restatements.sql.

-- A batch run that recorded new lookup versions as every sealed segment's
-- (`lambda-ctl run --refresh-lookups`), written in the same transaction as those versions. A
-- view whose current publication comes from an earlier run was computed with versions the
-- segments no longer record: every later run recomputes it from every segment, so a refresh
-- that fails or is killed before it publishes heals on the next run of any kind.
CREATE TABLE restatements (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline   TEXT        NOT NULL,
    run_id     BIGINT      NOT NULL,
    -- The versions recorded (JSON {"LOOKUP": "VERSION"}); NULL for a pipeline without lookups.
    lookups    TEXT,
    segments   BIGINT      NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX restatements_by_pipeline ON restatements (pipeline, run_id);
