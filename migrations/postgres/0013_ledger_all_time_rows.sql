-- A publication's change of an all-time row (window_start_ms NULL) is recorded once too: in the
-- unique index of 0009 NULLs were distinct, so two servers switching to one publication at the
-- same moment could both record it. Keep the first copy of each, then index the window start
-- with the all-time window as -1 (a view is either all-time or windowed, never both).
DELETE FROM ledger
WHERE publication_id IS NOT NULL
  AND window_start_ms IS NULL
  AND id NOT IN (
      SELECT MIN(id) FROM ledger
      WHERE publication_id IS NOT NULL AND window_start_ms IS NULL
      GROUP BY publication_id, group_key
  );
DROP INDEX ledger_publication_rows;
CREATE UNIQUE INDEX ledger_publication_rows
    ON ledger (publication_id, COALESCE(window_start_ms, -1), group_key)
    WHERE publication_id IS NOT NULL;
