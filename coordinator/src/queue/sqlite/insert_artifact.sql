INSERT INTO artifacts (
    run_id, job_id, attempt, artifact_key, size_bytes, sha256, prompt_set,
    prompt_id, mode, layer, prompt_tokens, response_tokens, shapes, created_at
)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
