-- Leases the oldest claimable job for one model to a worker (inside a
-- BEGIN IMMEDIATE transaction, which also records the attempt).
-- ?1 worker id, ?2 model id, ?3 model revision, ?4 now (unix ms), ?5 lease ms.
UPDATE jobs
SET state = 'leased',
    attempt = attempt + 1,
    lease_owner = ?1,
    lease_expires_at = ?4 + ?5,
    started_at = ?4,
    first_started_at = coalesce(first_started_at, ?4)
WHERE id = (
    SELECT candidate.id
    FROM jobs AS candidate
    WHERE candidate.state = 'queued'
      AND candidate.model_id = ?2
      AND candidate.model_revision = ?3
      AND candidate.run_after <= ?4
      AND NOT EXISTS (
          SELECT 1 FROM runs
          WHERE runs.id = candidate.run_id AND runs.cancel_requested = 1
      )
    ORDER BY candidate.created_at, candidate.id
    LIMIT 1
)
RETURNING *
