-- The coordinator's durable job queue: runs, their jobs, every attempt at a
-- job (the lease history), the artifacts accepted completions recorded, and
-- the workers seen. Claims, heartbeats and completions are fenced on
-- (jobs.attempt, jobs.lease_owner, jobs.state = 'leased'); see
-- coordinator/src/queue/mod.rs.

CREATE TABLE runs (
    id               uuid        PRIMARY KEY,
    experiment       text        NOT NULL,
    -- what was asked: prompt sets x modes x decoding x model x store dtype
    spec             jsonb       NOT NULL,
    model_id         text        NOT NULL,
    model_revision   text        NOT NULL,
    state            text        NOT NULL DEFAULT 'running'
                     CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested boolean     NOT NULL DEFAULT false,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

CREATE INDEX runs_by_created_at ON runs (created_at DESC, id);
CREATE INDEX runs_by_experiment ON runs (experiment, created_at DESC);

CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    run_id           uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- deterministic, e.g. "{set}/{mode}/{shard index}": resubmitting never duplicates
    job_key          text        NOT NULL,
    payload          jsonb       NOT NULL,
    model_id         text        NOT NULL,
    model_revision   text        NOT NULL,
    state            text        NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'leased', 'succeeded', 'dead', 'cancelled')),
    -- number of the latest claim; 0 until first claimed, bumped by every claim
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- a claim that would make attempt exceed this is never made: the job is dead
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    lease_owner      text,
    lease_expires_at timestamptz,
    -- backoff: not claimable before this
    run_after        timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    first_started_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (run_id, job_key),
    CHECK ((state = 'leased') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- the claim query: oldest queued job for one model
CREATE INDEX jobs_claimable ON jobs (model_id, model_revision, created_at, id)
    WHERE state = 'queued';
-- the reaper: leases by expiry
CREATE INDEX jobs_leased_by_expiry ON jobs (lease_expires_at) WHERE state = 'leased';
-- progress of a run
CREATE INDEX jobs_by_run_state ON jobs (run_id, state);

CREATE TABLE attempts (
    job_id     uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    integer     NOT NULL CHECK (attempt >= 1),
    worker_id  text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    outcome    text        CHECK (outcome IN ('succeeded', 'failed', 'lease_expired')),
    error      text,
    -- one row per claim: two leases of one attempt number cannot both exist
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE artifacts (
    run_id          uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    job_id          uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    -- path below the run root, e.g. inference/raw/residual/{set}/{id}.pt
    artifact_key    text        NOT NULL,
    size_bytes      bigint      NOT NULL CHECK (size_bytes >= 0),
    sha256          text        NOT NULL,
    prompt_set      text        NOT NULL,
    prompt_id       text        NOT NULL,
    mode            text        NOT NULL,
    layer           integer,
    prompt_tokens   integer,
    response_tokens integer,
    shapes          jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, artifact_key),
    FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
);

CREATE INDEX artifacts_by_job ON artifacts (job_id);

CREATE TABLE workers (
    id             text        PRIMARY KEY,
    model_id       text        NOT NULL,
    model_revision text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('idle', 'busy', 'draining', 'stopped')),
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now()
);
