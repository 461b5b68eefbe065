-- Schedules the retries in ?1 (a JSON array of {id, owner, attempt, at, http_status, detail,
-- outcome_unknown, now}) in one statement, each guarded by its lease.
WITH v AS (
    SELECT value ->> 'id' AS id, value ->> 'owner' AS owner, value ->> 'attempt' AS attempt,
           value ->> 'at' AS at, value ->> 'http_status' AS http_status,
           value ->> 'detail' AS detail, value ->> 'outcome_unknown' AS outcome_unknown,
           value ->> 'now' AS now
    FROM json_each(?1)
)
UPDATE jobs
SET state = 'retry_wait', next_attempt_at = v.at, last_http_status = v.http_status,
    failure_detail = v.detail, outcome_unknown = v.outcome_unknown, lease_owner = NULL,
    lease_expires_at = NULL, updated_at = v.now, version = version + 1
FROM v
WHERE jobs.id = v.id AND jobs.state = 'running' AND jobs.lease_owner = v.owner
  AND jobs.attempts = v.attempt
RETURNING *
