SELECT MIN(created_at) AS oldest FROM jobs WHERE state IN ('queued', 'retry_wait')
