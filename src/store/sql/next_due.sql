SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('queued', 'retry_wait')
