-- Every client with a job waiting, read once at start-up.
SELECT DISTINCT client_id FROM jobs WHERE state IN ('queued', 'retry_wait')
