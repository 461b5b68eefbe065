-- Jobs waiting (queued, or for a retry), read once when the writer starts.
SELECT COUNT(*) AS waiting FROM jobs WHERE state IN ('queued', 'retry_wait')
