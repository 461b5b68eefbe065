-- Schedules the retries in $1 (a JSON array) in one statement, each guarded by its lease.
-- (The lease owner, not the state: see finish_succeeded_many.sql.)
UPDATE jobs
SET state = 'retry_wait', next_attempt_at = v.at, last_http_status = v.http_status,
    failure_detail = v.detail, outcome_unknown = v.outcome_unknown, lease_owner = NULL,
    lease_expires_at = NULL, updated_at = v.now, version = version + 1
FROM jsonb_to_recordset($1::jsonb) AS v(id bigint, owner text, attempt bigint, at bigint,
                                        http_status bigint, detail text,
                                        outcome_unknown boolean, now bigint)
WHERE jobs.id = v.id AND jobs.lease_owner = v.owner
  AND jobs.attempts = v.attempt
RETURNING jobs.*
