UPDATE jobs
SET state = 'cancelled', next_attempt_at = NULL, code = NULL, code_verifier = NULL,
    failure_detail = 'cancelled by request', updated_at = ?2, version = version + 1
WHERE job_id = ?1 AND state IN ('queued', 'retry_wait')
RETURNING *
