-- ?1 experiment, ?2 state, ?3 limit, ?4 model id, ?5 model revision,
-- ?6 created at or after (unix ms), ?7 created before (unix ms), ?8 prompt
-- set named in the spec, ?9 capture mode in the spec; a NULL filter matches
-- every run.
SELECT *
FROM runs
WHERE (?1 IS NULL OR experiment = ?1)
  AND (?2 IS NULL OR state = ?2)
  AND (?4 IS NULL OR model_id = ?4)
  AND (?5 IS NULL OR model_revision = ?5)
  AND (?6 IS NULL OR created_at >= ?6)
  AND (?7 IS NULL OR created_at < ?7)
  AND (?8 IS NULL OR EXISTS (
        SELECT 1 FROM json_each(runs.spec, '$.prompt_sets') WHERE value = ?8))
  AND (?9 IS NULL OR EXISTS (
        SELECT 1 FROM json_each(runs.spec, '$.modes')
        WHERE json_extract(value, '$.mode') = ?9))
ORDER BY created_at DESC, id DESC
LIMIT ?3
