-- Moves a running run whose jobs are all terminal to its final state.
-- ?1 run id, ?2 now (unix ms).
UPDATE runs
SET state = CASE
        WHEN cancel_requested = 1 THEN 'cancelled'
        WHEN EXISTS (SELECT 1 FROM jobs WHERE run_id = ?1 AND state = 'dead') THEN 'failed'
        ELSE 'succeeded'
    END,
    error = CASE
        WHEN cancel_requested = 1 THEN error
        WHEN EXISTS (SELECT 1 FROM jobs WHERE run_id = ?1 AND state = 'dead') THEN
            (SELECT count(*) FROM jobs WHERE run_id = ?1 AND state = 'dead')
                || ' job(s) dead; see their last_error'
        ELSE NULL
    END,
    finished_at = ?2
WHERE id = ?1
  AND state = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM jobs WHERE run_id = ?1 AND state IN ('queued', 'leased')
  )
RETURNING state
