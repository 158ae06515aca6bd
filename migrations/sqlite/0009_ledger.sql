-- The restatement ledger (SQLite). Kept in step with migrations/postgres/0009_ledger.sql.

-- One row per window and group whose served value changed after it was served: by late events
-- of a sealed segment (arrived at or after the window's end), written in the transaction that
-- records the segment, so each segment's restatements are recorded exactly once; or by a batch
-- publication that restated history (`run --refresh-lookups`), written by the server that
-- switched to it, once per publication, window and group.
-- `GET /v1/views/{pipeline}/{view}/restatements`, `/metrics` and `status` read it.
CREATE TABLE ledger (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline        TEXT    NOT NULL,
    view            TEXT    NOT NULL,
    -- What restated the window: 'late' or 'publication'.
    cause           TEXT    NOT NULL,
    -- 'late': the segment whose events did it.
    partition       INTEGER,
    segment_lo      INTEGER,
    segment_hi      INTEGER,
    -- 'publication': the batch run that published it, and the publication.
    run_id          INTEGER,
    publication_id  INTEGER,
    -- The window; NULL for the all-time window.
    window_start_ms INTEGER,
    window_end_ms   INTEGER,
    -- JSON object: group_by column -> value.
    group_key       TEXT    NOT NULL,
    late_events     INTEGER NOT NULL,
    -- The latest of them: arrival - window end.
    max_lateness_ms INTEGER NOT NULL,
    -- JSON object: metric -> {"before", "after", "delta"}.
    metrics         TEXT    NOT NULL,
    recorded_at_ms  INTEGER NOT NULL
) STRICT;
CREATE INDEX ledger_by_view ON ledger (pipeline, view, recorded_at_ms);
-- A publication's change of a row is recorded once, whichever server saw it first.
CREATE UNIQUE INDEX ledger_publication_rows ON ledger (publication_id, window_start_ms, group_key)
    WHERE publication_id IS NOT NULL;
