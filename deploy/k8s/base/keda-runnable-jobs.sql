-- KEDA's scaling metric for the capture workers of one model: the jobs that
-- need a worker now. The postgresql trigger of the ScaledObject
-- (keda.yaml; kustomize copies this file into spec.triggers[0].metadata.query)
-- polls it every pollingInterval; the HPA then runs
-- ceil(result / targetQueryValue) workers, and none once it stays 0 for the
-- cooldownPeriod.
--
-- Counted, for the model and revision the workers load (worker.yaml: --model,
-- --revision; keep the two literals below equal to them):
--   * queued jobs a worker could claim right now: the same conditions as the
--     claim query (coordinator/src/queue/postgres/claim.sql): run_after has
--     passed and the run is not being cancelled;
--   * leased jobs: a worker is on them. Without these, the metric would drop
--     to 0 as soon as the last jobs were claimed and KEDA would scale the
--     busy workers away mid-job.
-- Not counted: queued jobs still backing off (run_after in the future; they
-- are counted once it passes), finished jobs (succeeded, dead, cancelled),
-- queued jobs of runs being cancelled, and other models' jobs.
-- Served by the jobs_claimable partial index (model_id, model_revision, ...)
-- WHERE state = 'queued'. tests/tests/deploy.rs runs this file against the
-- migrated schema.
SELECT count(*)
FROM jobs
WHERE jobs.model_id = 'google/gemma-2-2b-it'
  AND jobs.model_revision = ''
  AND (
        jobs.state = 'leased'
     OR (
            jobs.state = 'queued'
        AND jobs.run_after <= now()
        AND NOT EXISTS (
                SELECT 1 FROM runs
                WHERE runs.id = jobs.run_id AND runs.cancel_requested
            )
        )
  )
