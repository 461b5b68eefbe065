-- The PostgreSQL schema: the same queue and audit trail as the SQLite schema (migrations/sqlite,
-- whose comments describe each column), in one migration, plus what replicas share: the lock
-- that orders the audit chain and the rate budget.
--
-- Times are integer milliseconds since the Unix epoch, as on SQLite.

CREATE TABLE jobs (
    id                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id             TEXT    NOT NULL UNIQUE,
    tenant             TEXT    NOT NULL,
    client_id          TEXT    NOT NULL,
    idempotency_key    TEXT    NOT NULL,
    request_digest     TEXT    NOT NULL,
    code               TEXT,
    code_verifier      TEXT,
    state_param        TEXT    NOT NULL,
    state              TEXT    NOT NULL CHECK (state IN
                           ('queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    attempts           BIGINT  NOT NULL DEFAULT 0,
    created_at         BIGINT  NOT NULL,
    updated_at         BIGINT  NOT NULL,
    next_attempt_at    BIGINT,
    expires_at         BIGINT  NOT NULL,
    lease_owner        TEXT,
    lease_expires_at   BIGINT,
    outcome_unknown    BOOLEAN NOT NULL DEFAULT false,
    access_token       TEXT,
    token_type         TEXT,
    token_expires_in   BIGINT,
    token_expires_at   BIGINT,
    failure_reason     TEXT,
    last_http_status   BIGINT,
    failure_detail     TEXT,
    version            BIGINT  NOT NULL DEFAULT 1,
    code_fingerprint   TEXT,
    token_delivered_at BIGINT,
    -- Idempotency across replicas: the same submission reaching two of them is one job.
    UNIQUE (tenant, idempotency_key)
);

CREATE INDEX jobs_due ON jobs (next_attempt_at, id) WHERE state IN ('queued', 'retry_wait');
CREATE INDEX jobs_expiring ON jobs (expires_at) WHERE state IN ('queued', 'retry_wait');
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_client ON jobs (client_id, id);
CREATE INDEX jobs_fingerprint ON jobs (code_fingerprint);
CREATE INDEX jobs_client_due ON jobs (client_id, expires_at)
    WHERE state IN ('queued', 'retry_wait');
CREATE INDEX jobs_token_expiry ON jobs (token_expires_at) WHERE access_token IS NOT NULL;
CREATE INDEX jobs_token_delivered ON jobs (token_delivered_at)
    WHERE access_token IS NOT NULL AND token_delivered_at IS NOT NULL;

CREATE TABLE audit_events (
    seq              BIGINT PRIMARY KEY,   -- assigned by the writer holding audit_chain's lock
    at               BIGINT NOT NULL,
    job_id           TEXT   NOT NULL,
    tenant           TEXT   NOT NULL,
    client_id        TEXT   NOT NULL,
    kind             TEXT   NOT NULL,
    attempt          BIGINT,
    http_status      BIGINT,
    detail           TEXT,
    code_fingerprint TEXT,
    prev_hash        TEXT,
    hash             TEXT
);

CREATE INDEX audit_events_job ON audit_events (job_id, seq);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_client ON audit_events (client_id, seq);

-- One row. Every writing transaction of every replica locks it first (SELECT ... FOR UPDATE)
-- and holds it to its commit, so the chain is extended in commit order, one writer at a time;
-- last_seq is the highest seq ever assigned (as SQLite's sqlite_sequence), so a cut tail shows.
CREATE TABLE audit_chain (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    last_seq BIGINT   NOT NULL
);
INSERT INTO audit_chain (id, last_seq) VALUES (1, 0);

-- The rate budget shared by replicas: GCRA state per limiter key ('global', 'client:<id>'),
-- with the adaptation to 429s (src/domain/budget.rs).
CREATE TABLE rate_budget (
    key            TEXT             PRIMARY KEY,
    tat_us         BIGINT           NOT NULL,
    effective_rps  DOUBLE PRECISION NOT NULL,
    paused_until   BIGINT           NOT NULL DEFAULT 0,
    last_throttled BIGINT           NOT NULL DEFAULT 0,
    last_recovery  BIGINT           NOT NULL DEFAULT 0
);
