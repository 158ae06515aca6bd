-- Candidate view versions (blue/green, postgres). Kept in step with the other backend's 0011_candidates.sql.

-- `lambda-ctl run PIPELINE --candidate`: a view version computed by the edited YAML beside the
-- live one, not current (serving keeps answering with the live one). One per view: a new
-- candidate replaces the previous. `diff` and `?version=candidate` read it; `discard`
-- forgets it.
CREATE TABLE candidates (
    pipeline       TEXT    NOT NULL,
    view           TEXT    NOT NULL,
    publication_id BIGINT NOT NULL,
    -- The publication current when the candidate was computed; NULL: none was.
    live_id        BIGINT,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (pipeline, view)
);
