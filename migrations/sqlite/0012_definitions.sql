-- The definitions views were served by (SQLite). Kept in step with migrations/postgres/0012_definitions.sql.

-- One row per view definition a server ran: the text of the pipeline's YAML file that defined
-- view `view` with logic `logic_hash`, recorded when a server first served it (at start, or at a
-- promote). `as_of` answers from before a change of definition recompute with it.
CREATE TABLE definitions (
    pipeline       TEXT    NOT NULL,
    view           TEXT    NOT NULL,
    logic_hash     TEXT    NOT NULL,
    spec           TEXT    NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (pipeline, view, logic_hash)
) STRICT;
