-- Restated history (SQLite). Kept in step with migrations/postgres/0007_restatements.sql.

-- A batch run that recorded new lookup versions as every sealed segment's
-- (`lambda-ctl run --refresh-lookups`), written in the same transaction as those versions. A
-- view whose current publication comes from an earlier run was computed with versions the
-- segments no longer record: every later run recomputes it from every segment, so a refresh
-- that fails or is killed before it publishes heals on the next run of any kind.
CREATE TABLE restatements (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline   TEXT    NOT NULL,
    run_id     INTEGER NOT NULL,
    -- The versions recorded (JSON {"LOOKUP": "VERSION"}); NULL for a pipeline without lookups.
    lookups    TEXT,
    segments   INTEGER NOT NULL,
    created_at TEXT    NOT NULL
) STRICT;
CREATE INDEX restatements_by_pipeline ON restatements (pipeline, run_id);
