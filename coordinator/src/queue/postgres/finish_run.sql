-- Moves a running run whose jobs are all terminal to its final state.
-- Runs after the run row was locked, so concurrent last completions cannot
-- both miss each other. $1 run id.
UPDATE runs
SET state = CASE
        WHEN cancel_requested THEN 'cancelled'
        WHEN EXISTS (SELECT 1 FROM jobs WHERE run_id = $1 AND state = 'dead') THEN 'failed'
        ELSE 'succeeded'
    END,
    error = CASE
        WHEN cancel_requested THEN error
        WHEN EXISTS (SELECT 1 FROM jobs WHERE run_id = $1 AND state = 'dead') THEN
            (SELECT count(*) FROM jobs WHERE run_id = $1 AND state = 'dead')::text
                || ' job(s) dead; see their last_error'
        ELSE NULL
    END,
    finished_at = now()
WHERE id = $1
  AND state = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM jobs WHERE run_id = $1 AND state IN ('queued', 'leased')
  )
RETURNING state
