-- The coordinator's durable job queue (SQLite flavour of
-- migrations/postgres/0001_job_queue.sql): same tables and semantics; ids are
-- hyphenated uuid TEXT, times are unix milliseconds (INTEGER) written by the
-- coordinator's clock, JSON is TEXT, booleans are 0/1.

CREATE TABLE runs (
    id               TEXT    PRIMARY KEY NOT NULL,
    experiment       TEXT    NOT NULL,
    spec             TEXT    NOT NULL,
    model_id         TEXT    NOT NULL,
    model_revision   TEXT    NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'running'
                     CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    error            TEXT,
    created_at       INTEGER NOT NULL,
    finished_at      INTEGER
);

CREATE INDEX runs_by_created_at ON runs (created_at DESC, id);
CREATE INDEX runs_by_experiment ON runs (experiment, created_at DESC);

CREATE TABLE jobs (
    id               TEXT    PRIMARY KEY NOT NULL,
    run_id           TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    job_key          TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    model_id         TEXT    NOT NULL,
    model_revision   TEXT    NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'leased', 'succeeded', 'dead', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    run_after        INTEGER NOT NULL,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    first_started_at INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER,
    UNIQUE (run_id, job_key),
    CHECK ((state = 'leased') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);

CREATE INDEX jobs_claimable ON jobs (model_id, model_revision, created_at, id)
    WHERE state = 'queued';
CREATE INDEX jobs_leased_by_expiry ON jobs (lease_expires_at) WHERE state = 'leased';
CREATE INDEX jobs_by_run_state ON jobs (run_id, state);

CREATE TABLE attempts (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL CHECK (attempt >= 1),
    worker_id  TEXT    NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER,
    outcome    TEXT    CHECK (outcome IN ('succeeded', 'failed', 'lease_expired')),
    error      TEXT,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE artifacts (
    run_id          TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    job_id          TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    artifact_key    TEXT    NOT NULL,
    size_bytes      INTEGER NOT NULL CHECK (size_bytes >= 0),
    sha256          TEXT    NOT NULL,
    prompt_set      TEXT    NOT NULL,
    prompt_id       TEXT    NOT NULL,
    mode            TEXT    NOT NULL,
    layer           INTEGER,
    prompt_tokens   INTEGER,
    response_tokens INTEGER,
    shapes          TEXT    NOT NULL DEFAULT '{}',
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (run_id, artifact_key),
    FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
);

CREATE INDEX artifacts_by_job ON artifacts (job_id);

CREATE TABLE workers (
    id             TEXT    PRIMARY KEY NOT NULL,
    model_id       TEXT    NOT NULL,
    model_revision TEXT    NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('idle', 'busy', 'draining', 'stopped')),
    first_seen_at  INTEGER NOT NULL,
    last_seen_at   INTEGER NOT NULL
);
