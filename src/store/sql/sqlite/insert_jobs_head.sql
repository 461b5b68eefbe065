-- The head of a multi-row job insert: the writer appends one tuple per new job, then
-- insert_jobs_tail.sql.
INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest, code,
                  code_verifier, state_param, state, created_at, updated_at, next_attempt_at,
                  expires_at, code_fingerprint) VALUES
