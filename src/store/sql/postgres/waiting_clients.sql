SELECT DISTINCT client_id FROM jobs WHERE state IN ('queued', 'retry_wait')
