-- The due jobs of the clients in ?1 (a JSON array of client ids), at most ?3 per client and
-- ?3 in all, closest to their TTL first. Each client's jobs are found through jobs_client_due by a
-- correlated subquery with its own LIMIT, so a client's deep backlog is never scanned past
-- what is taken. Jobs past their TTL are left to the expiry sweep, which fails them without an
-- upstream request.
SELECT j.id, j.client_id, j.next_attempt_at, j.expires_at
FROM json_each(?1) AS c
JOIN jobs AS j ON j.id IN (
    SELECT id FROM jobs
    WHERE client_id = c.value
      AND state IN ('queued', 'retry_wait')
      AND expires_at > ?2
      AND next_attempt_at <= ?2
    ORDER BY expires_at, id
    LIMIT ?3
)
ORDER BY j.expires_at, j.id
LIMIT ?3
