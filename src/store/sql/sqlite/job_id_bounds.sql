-- Turns a creation-time range into a row-id range through the jobs_created index, so that
-- pages walk the primary key. Ids and creation times both grow with insertion; a wall clock
-- stepped backwards can shift a job across the window's edge by at most the step.
SELECT (SELECT id FROM jobs WHERE created_at >= ?1 ORDER BY created_at, id LIMIT 1) AS lo,
       (SELECT id FROM jobs WHERE created_at < ?2 ORDER BY created_at DESC, id DESC LIMIT 1) AS hi
