-- A job by id, only if it belongs to tenant $2.
SELECT * FROM jobs WHERE job_id = $1 AND tenant = $2
