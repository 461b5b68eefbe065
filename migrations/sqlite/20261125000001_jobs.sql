-- The durable queue and its audit trail.
--
-- Times are integer milliseconds since the Unix epoch. States and failure reasons are the
-- lower-case names in src/job.rs.

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,          -- rowid: compact claim order and index key
    job_id           TEXT    NOT NULL UNIQUE,      -- UUIDv7 shown to callers
    tenant           TEXT    NOT NULL,
    client_id        TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    request_digest   TEXT    NOT NULL,             -- SHA-256 over the request's fields
    code             TEXT,                         -- secret; erased when the job is terminal
    code_verifier    TEXT,                         -- secret; erased when the job is terminal
    state_param      TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN
                         ('queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    next_attempt_at  INTEGER,                      -- set while queued or retry_wait
    expires_at       INTEGER NOT NULL,             -- created_at + the job's time to live
    lease_owner      TEXT,                         -- the worker running the current attempt
    lease_expires_at INTEGER,
    outcome_unknown  INTEGER NOT NULL DEFAULT 0,   -- an attempt may have reached upstream unseen
    access_token     TEXT,                         -- secret
    token_type       TEXT,
    token_expires_in INTEGER,
    token_expires_at INTEGER,
    failure_reason   TEXT,
    last_http_status INTEGER,
    failure_detail   TEXT,
    version          INTEGER NOT NULL DEFAULT 1,   -- bumped by every change
    UNIQUE (tenant, idempotency_key)
);

-- Claiming: due jobs in due order, without scanning terminal rows.
CREATE INDEX jobs_due ON jobs (next_attempt_at, id) WHERE state IN ('queued', 'retry_wait');
-- Expiry sweep over jobs that can still expire.
CREATE INDEX jobs_expiring ON jobs (expires_at) WHERE state IN ('queued', 'retry_wait');
-- Rescue of attempts whose worker died.
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';

CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so gaps show deletions
    at          INTEGER NOT NULL,
    job_id      TEXT    NOT NULL,
    tenant      TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    kind        TEXT    NOT NULL,                  -- job.submitted, attempt.started, ...
    attempt     INTEGER,
    http_status INTEGER,
    detail      TEXT
);

CREATE INDEX audit_events_job ON audit_events (job_id, seq);
