-- Records one success, guarded by its lease (row ?1, owner ?2, attempt ?3): a stale worker's
-- outcome changes nothing. SQLite's writer runs it once per success, in place: binding the
-- values costs less than a JSON array of the batch's successes parsed back by SQLite
-- (`finish_succeeded_many.sql`, which PostgreSQL runs, saving round trips).
UPDATE jobs
SET state = 'succeeded', access_token = ?4, token_type = ?5, token_expires_in = ?6,
    token_expires_at = ?7, last_http_status = ?8, outcome_unknown = ?9, failure_detail = NULL,
    lease_owner = NULL, lease_expires_at = NULL, code = NULL, code_verifier = NULL,
    updated_at = ?10, version = version + 1
WHERE id = ?1 AND state = 'running' AND lease_owner = ?2 AND attempts = ?3
RETURNING *
