-- When the oldest job still waiting to be attempted was created (scanned over the partial
-- index of waiting jobs only).
SELECT MIN(created_at) AS oldest FROM jobs WHERE state IN ('queued', 'retry_wait')
