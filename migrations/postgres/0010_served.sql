-- What each view served from when (PostgreSQL). Kept in step with migrations/sqlite/0010_served.sql.

-- One row per install by a server's pickup: from instant `at_ns` (a tick: epoch ms × 10⁶ + the
-- things that happened in that millisecond before and including it) the view served publication
-- `publication_id` (NULL: none, the speed layer alone) computed by logic `logic_hash`. `as_of`
-- answers read the row current at their instant; GC keeps the publications `serve.history`
-- needs.
CREATE TABLE served (
    pipeline       TEXT   NOT NULL,
    view           TEXT   NOT NULL,
    at_ns          BIGINT NOT NULL,
    publication_id BIGINT,
    logic_hash     TEXT   NOT NULL,
    PRIMARY KEY (pipeline, view, at_ns)
);
CREATE INDEX served_by_pipeline ON served (pipeline, at_ns);
