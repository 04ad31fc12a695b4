-- $1 experiment, $2 state, $3 limit, $4 model id, $5 model revision,
-- $6 created at or after, $7 created before, $8 prompt set named in the
-- spec, $9 capture mode in the spec; a NULL filter matches every run.
SELECT *
FROM runs
WHERE ($1::text IS NULL OR experiment = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($4::text IS NULL OR model_id = $4)
  AND ($5::text IS NULL OR model_revision = $5)
  AND ($6::timestamptz IS NULL OR created_at >= $6)
  AND ($7::timestamptz IS NULL OR created_at < $7)
  AND ($8::text IS NULL OR spec -> 'prompt_sets' @> jsonb_build_array($8::text))
  AND ($9::text IS NULL OR spec -> 'modes' @> jsonb_build_array(jsonb_build_object('mode', $9::text)))
ORDER BY created_at DESC, id DESC
LIMIT $3
