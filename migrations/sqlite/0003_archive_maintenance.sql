-- Archive maintenance (SQLite). Kept in step with migrations/postgres/0003_archive_maintenance.sql.

-- Lake objects no longer referenced by the manifest: segments replaced by compaction or dropped
-- by retention. A batch run that listed the manifest before the change may still be reading
-- them, so their files are deleted only after a grace period; the row goes with the file.
CREATE TABLE retired_objects (
    path       TEXT PRIMARY KEY,
    pipeline   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    retired_at TEXT NOT NULL
) STRICT;
CREATE INDEX retired_objects_by_time ON retired_objects (retired_at);
