-- Ends a held lease as failed: queued again after the backoff when
-- retryable with attempts left, else dead keeping the error.
-- $1 job, $2 attempt, $3 worker, $4 retryable, $5 backoff ms, $6 error.
UPDATE jobs
SET state = CASE WHEN $4 AND attempt < max_attempts THEN 'queued' ELSE 'dead' END,
    run_after = CASE
        WHEN $4 AND attempt < max_attempts THEN now() + $5::bigint * interval '1 millisecond'
        ELSE run_after
    END,
    finished_at = CASE WHEN $4 AND attempt < max_attempts THEN NULL ELSE now() END,
    last_error = $6,
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE id = $1
  AND attempt = $2
  AND lease_owner = $3
  AND state = 'leased'
  AND lease_expires_at > now()
RETURNING run_id, state, run_after
