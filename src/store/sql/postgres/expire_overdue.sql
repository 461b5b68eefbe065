UPDATE jobs
SET state = 'failed', failure_reason = 'expired', next_attempt_at = NULL,
    failure_detail = 'the job outlived its time to live', code = NULL, code_verifier = NULL,
    updated_at = $1, version = version + 1
WHERE id IN (SELECT id FROM jobs
             WHERE state IN ('queued', 'retry_wait') AND expires_at <= $1
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
RETURNING *
