-- Leases the oldest claimable job for one model to a worker, in one
-- statement: bumps the attempt, sets owner and expiry, records the attempt.
-- $1 worker id, $2 model id, $3 model revision, $4 lease in milliseconds.
WITH claimed AS (
    UPDATE jobs
    SET state = 'leased',
        attempt = jobs.attempt + 1,
        lease_owner = $1,
        lease_expires_at = now() + $4::bigint * interval '1 millisecond',
        started_at = now(),
        first_started_at = coalesce(jobs.first_started_at, now())
    WHERE jobs.id = (
        SELECT candidate.id
        FROM jobs AS candidate
        WHERE candidate.state = 'queued'
          AND candidate.model_id = $2
          AND candidate.model_revision = $3
          AND candidate.run_after <= now()
          AND NOT EXISTS (
              SELECT 1 FROM runs
              WHERE runs.id = candidate.run_id AND runs.cancel_requested
          )
        ORDER BY candidate.created_at, candidate.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING jobs.*
),
recorded_attempt AS (
    INSERT INTO attempts (job_id, attempt, worker_id, started_at)
    SELECT claimed.id, claimed.attempt, claimed.lease_owner, now()
    FROM claimed
)
SELECT claimed.*, runs.spec AS run_spec
FROM claimed
JOIN runs ON runs.id = claimed.run_id
