-- The due jobs of the clients in $1 (a JSON array of client ids), at most $3 per client and
-- $3 in all, closest to their TTL first, each client's through jobs_client_due.
SELECT j.id, j.client_id, j.next_attempt_at, j.expires_at
FROM jsonb_array_elements_text($1::jsonb) AS c(value)
CROSS JOIN LATERAL (
    SELECT id, client_id, next_attempt_at, expires_at FROM jobs
    WHERE client_id = c.value
      AND state IN ('queued', 'retry_wait')
      AND expires_at > $2
      AND next_attempt_at <= $2
    ORDER BY expires_at, id
    LIMIT $3
) AS j
ORDER BY j.expires_at, j.id
LIMIT $3
