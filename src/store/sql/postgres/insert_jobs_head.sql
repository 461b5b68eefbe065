-- The head of a multi-row job insert: the writer appends one tuple per new job, then
-- insert_jobs_tail.sql. A job is inserted queued, or running its first attempt (attempts 1,
-- a lease) when its submission starts it.
INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest, code,
                  code_verifier, state_param, state, created_at, updated_at, next_attempt_at,
                  expires_at, code_fingerprint, attempts, lease_owner, lease_expires_at) VALUES
