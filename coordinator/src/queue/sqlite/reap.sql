-- Releases every expired lease: the job is queued again (the next claim
-- bumps its attempt, fencing the old holder out) or, with its attempts
-- spent, dead. ?1 now (unix ms).
UPDATE jobs
SET state = CASE WHEN attempt < max_attempts THEN 'queued' ELSE 'dead' END,
    finished_at = CASE WHEN attempt < max_attempts THEN NULL ELSE ?1 END,
    last_error = 'lease expired: worker ' || lease_owner
        || ' stopped heartbeating during attempt ' || attempt,
    run_after = ?1,
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE state = 'leased' AND lease_expires_at <= ?1
RETURNING id, run_id, attempt, state, last_error
