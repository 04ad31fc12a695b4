-- Releases up to $1 expired leases in one statement: each job is queued
-- again (the next claim bumps its attempt, fencing the old holder out) or,
-- with its attempts spent, dead; its attempt row is closed as lease_expired.
WITH expired AS (
    SELECT id
    FROM jobs
    WHERE state = 'leased' AND lease_expires_at <= now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
released AS (
    UPDATE jobs
    SET state = CASE WHEN jobs.attempt < jobs.max_attempts THEN 'queued' ELSE 'dead' END,
        finished_at = CASE WHEN jobs.attempt < jobs.max_attempts THEN NULL ELSE now() END,
        last_error = 'lease expired: worker ' || jobs.lease_owner
            || ' stopped heartbeating during attempt ' || jobs.attempt,
        run_after = now(),
        lease_owner = NULL,
        lease_expires_at = NULL
    FROM expired
    WHERE jobs.id = expired.id
    RETURNING jobs.id, jobs.run_id, jobs.attempt, jobs.state, jobs.last_error
),
closed_attempts AS (
    UPDATE attempts
    SET ended_at = now(), outcome = 'lease_expired', error = released.last_error
    FROM released
    WHERE attempts.job_id = released.id AND attempts.attempt = released.attempt
)
SELECT id, run_id, attempt, state FROM released
