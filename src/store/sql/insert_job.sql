-- Inserts nothing (and returns no row) when the tenant already used this idempotency key.
INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest, code,
                  code_verifier, state_param, state, created_at, updated_at, next_attempt_at,
                  expires_at, code_fingerprint)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', ?9, ?9, ?9, ?10, ?11)
ON CONFLICT (tenant, idempotency_key) DO NOTHING
RETURNING *
