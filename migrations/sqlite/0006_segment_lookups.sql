-- Lookup versions per segment (SQLite). Kept in step with migrations/postgres/0006_segment_lookups.sql.

-- The versions of the pipeline's lookup tables the segment's events were enriched with, as
-- JSON {"LOOKUP": "VERSION", ...} (each version a file lookups/{pipeline}/{lookup}/{version}.parquet
-- in the lake); NULL for a pipeline without lookups. The batch layer and recovery enrich the
-- segment with exactly these, so both layers compute the same answer.
ALTER TABLE segments ADD COLUMN lookups TEXT;
