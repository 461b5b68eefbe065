-- Records the successes in ?1 (a JSON array of {id, owner, attempt, access_token, token_type,
-- expires_in, expires_at, http_status, outcome_unknown, now}) in one statement, each guarded
-- by its lease (row, owner, attempt): a stale worker's outcome changes nothing.
WITH v AS (
    SELECT value ->> 'id' AS id, value ->> 'owner' AS owner, value ->> 'attempt' AS attempt,
           value ->> 'access_token' AS access_token, value ->> 'token_type' AS token_type,
           value ->> 'expires_in' AS expires_in, value ->> 'expires_at' AS expires_at,
           value ->> 'http_status' AS http_status,
           value ->> 'outcome_unknown' AS outcome_unknown, value ->> 'now' AS now
    FROM json_each(?1)
)
UPDATE jobs
SET state = 'succeeded', access_token = v.access_token, token_type = v.token_type,
    token_expires_in = v.expires_in, token_expires_at = v.expires_at,
    last_http_status = v.http_status, outcome_unknown = v.outcome_unknown, failure_detail = NULL,
    lease_owner = NULL, lease_expires_at = NULL, code = NULL, code_verifier = NULL,
    updated_at = v.now, version = version + 1
FROM v
WHERE jobs.id = v.id AND jobs.state = 'running' AND jobs.lease_owner = v.owner
  AND jobs.attempts = v.attempt
RETURNING *
