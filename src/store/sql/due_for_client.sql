-- One client's due jobs, closest to their TTL first, through jobs_client_due. Jobs past their
-- TTL are left to the expiry sweep, which fails them without an upstream request.
SELECT id, client_id, next_attempt_at, expires_at FROM jobs
WHERE client_id = ?1
  AND state IN ('queued', 'retry_wait')
  AND expires_at > ?2
  AND next_attempt_at <= ?2
ORDER BY expires_at, id
LIMIT ?3
