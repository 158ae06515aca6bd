-- What each view served from when (SQLite). Kept in step with migrations/postgres/0010_served.sql.

-- One row per install by a server's pickup: from instant `at_ns` (a tick: epoch ms × 10⁶ + the
-- things that happened in that millisecond before and including it) the view served publication
-- `publication_id` (NULL: none, the speed layer alone) computed by logic `logic_hash`. `as_of`
-- answers read the row current at their instant; GC keeps the publications `serve.history`
-- needs.
CREATE TABLE served (
    pipeline       TEXT    NOT NULL,
    view           TEXT    NOT NULL,
    at_ns          INTEGER NOT NULL,
    publication_id INTEGER,
    logic_hash     TEXT    NOT NULL,
    PRIMARY KEY (pipeline, view, at_ns)
) STRICT;
CREATE INDEX served_by_pipeline ON served (pipeline, at_ns);
