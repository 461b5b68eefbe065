-- A job by id, only if it belongs to tenant ?2: another tenant's job is not even read (or its
-- token decrypted), so it costs what a missing job costs.
SELECT * FROM jobs WHERE job_id = ?1 AND tenant = ?2
