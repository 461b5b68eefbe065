-- Attempts whose worker died (lease expired before $2 and before the database's now, the
-- clock claims set leases by, whichever replica held it) may have
-- reached upstream: mark the outcome unknown, and retry at once, unless no attempt is left.
UPDATE jobs
SET state = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'retry_wait' END,
    failure_reason = CASE WHEN attempts >= $3 THEN 'retries_exhausted' ELSE NULL END,
    next_attempt_at = CASE WHEN attempts >= $3 THEN NULL ELSE $1 END,
    code = CASE WHEN attempts >= $3 THEN NULL ELSE code END,
    code_verifier = CASE WHEN attempts >= $3 THEN NULL ELSE code_verifier END,
    failure_detail = 'the worker running an attempt stopped before its answer was recorded',
    outcome_unknown = true, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = $1, version = version + 1
WHERE id IN (SELECT id FROM jobs
             WHERE state = 'running'
               AND lease_expires_at <= LEAST($2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
             LIMIT $4
             FOR UPDATE SKIP LOCKED)
RETURNING *
