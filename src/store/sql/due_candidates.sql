-- Due jobs, closest to their TTL first, skipping clients whose rate limit is exhausted (?2: a
-- JSON array) and jobs past their time to live (the expiry sweep fails those without an
-- upstream request).
SELECT id, client_id, next_attempt_at FROM jobs
WHERE state IN ('queued', 'retry_wait')
  AND next_attempt_at <= ?1
  AND expires_at > ?1
  AND client_id NOT IN (SELECT value FROM json_each(?2))
ORDER BY expires_at, id
LIMIT ?3
