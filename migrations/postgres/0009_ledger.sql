-- The restatement ledger (PostgreSQL). Kept in step with migrations/sqlite/0009_ledger.sql.

-- One row per window and group whose served value changed after it was served: by late events
-- of a sealed segment (arrived at or after the window's end), written in the transaction that
-- records the segment, so each segment's restatements are recorded exactly once; or by a batch
-- publication that restated history (`run --refresh-lookups`), written by the server that
-- switched to it, once per publication, window and group.
-- `GET /v1/views/{pipeline}/{view}/restatements`, `/metrics` and `status` read it.
CREATE TABLE ledger (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline        TEXT   NOT NULL,
    view            TEXT   NOT NULL,
    -- What restated the window: 'late' or 'publication'.
    cause           TEXT   NOT NULL,
    -- 'late': the segment whose events did it.
    partition       BIGINT,
    segment_lo      BIGINT,
    segment_hi      BIGINT,
    -- 'publication': the batch run that published it, and the publication.
    run_id          BIGINT,
    publication_id  BIGINT,
    -- The window; NULL for the all-time window.
    window_start_ms BIGINT,
    window_end_ms   BIGINT,
    -- JSON object: group_by column -> value.
    group_key       TEXT   NOT NULL,
    late_events     BIGINT NOT NULL,
    -- The latest of them: arrival - window end.
    max_lateness_ms BIGINT NOT NULL,
    -- JSON object: metric -> {"before", "after", "delta"}.
    metrics         TEXT   NOT NULL,
    recorded_at_ms  BIGINT NOT NULL
);
CREATE INDEX ledger_by_view ON ledger (pipeline, view, recorded_at_ms);
-- A publication's change of a row is recorded once, whichever server saw it first.
CREATE UNIQUE INDEX ledger_publication_rows ON ledger (publication_id, window_start_ms, group_key)
    WHERE publication_id IS NOT NULL;
