-- Records the successes in $1 (a JSON array) in one statement, each guarded by its lease (row,
-- owner, attempt): a stale worker's outcome changes nothing. A job has a lease owner only
-- while it runs, so the owner is the guard; the state is not named, which would lead the
-- planner to the partial index of running jobs, whose dead entries (every job has run) grow
-- between vacuums, instead of the primary key.
UPDATE jobs
SET state = 'succeeded', access_token = v.access_token, token_type = v.token_type,
    token_expires_in = v.expires_in, token_expires_at = v.expires_at,
    last_http_status = v.http_status, outcome_unknown = v.outcome_unknown, failure_detail = NULL,
    lease_owner = NULL, lease_expires_at = NULL, code = NULL, code_verifier = NULL,
    updated_at = v.now, version = version + 1
FROM jsonb_to_recordset($1::jsonb) AS v(id bigint, owner text, attempt bigint,
                                        access_token text, token_type text, expires_in bigint,
                                        expires_at bigint, http_status bigint,
                                        outcome_unknown boolean, now bigint)
WHERE jobs.id = v.id AND jobs.lease_owner = v.owner
  AND jobs.attempts = v.attempt
RETURNING jobs.*
