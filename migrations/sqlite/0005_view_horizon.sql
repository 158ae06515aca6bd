-- Retention of served windows (SQLite). Kept in step with migrations/postgres/0005_view_horizon.sql.

-- A view version leaves out every window that ended at or before this instant (epoch ms), and
-- serving leaves them out of the speed layer's part of the answer too. Set by the `retention`
-- task, carried forward by every later version of the view; NULL: no window was retired.
ALTER TABLE publications ADD COLUMN horizon_ms INTEGER;
