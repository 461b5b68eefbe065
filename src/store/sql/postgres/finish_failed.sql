-- Guarded by lease owner and attempt: a stale worker changes nothing.
UPDATE jobs
SET state = 'failed', failure_reason = $4, last_http_status = $5, failure_detail = $6,
    outcome_unknown = $7, lease_owner = NULL, lease_expires_at = NULL,
    code = NULL, code_verifier = NULL, updated_at = $8, version = version + 1
WHERE id = $1 AND state = 'running' AND lease_owner = $2 AND attempts = $3
RETURNING *
