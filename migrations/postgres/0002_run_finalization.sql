-- A run is finalized once its accepted artifacts are promoted to their
-- documented keys and its manifest.json is written at the run root. The
-- coordinator finalizes terminal runs whose finalized_at is NULL, so a crash
-- between the last completion and the manifest is repaired at restart.
ALTER TABLE runs ADD COLUMN finalized_at timestamptz;

CREATE INDEX runs_to_finalize ON runs (finished_at) WHERE state <> 'running' AND finalized_at IS NULL;
