-- ?1 experiment or NULL, ?2 state or NULL, ?3 limit.
SELECT *
FROM runs
WHERE (?1 IS NULL OR experiment = ?1)
  AND (?2 IS NULL OR state = ?2)
ORDER BY created_at DESC, id DESC
LIMIT ?3
