-- SQLite flavour of migrations/postgres/0002_run_finalization.sql: runs get
-- finalized_at (unix ms) once artifacts are promoted and the manifest written.
ALTER TABLE runs ADD COLUMN finalized_at INTEGER;

CREATE INDEX runs_to_finalize ON runs (finished_at) WHERE state <> 'running' AND finalized_at IS NULL;
