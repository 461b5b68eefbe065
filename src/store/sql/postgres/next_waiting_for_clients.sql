-- For each client in $1 (a JSON array of client ids), when its next waiting job falls due
-- (NULL when it has none; jobs past their TTL are left to the expiry sweep), through
-- jobs_client_next: the first entry in due order not past its TTL.
SELECT c.value AS client_id,
    (SELECT next_attempt_at FROM jobs
     WHERE client_id = c.value
       AND state IN ('queued', 'retry_wait')
       AND expires_at > $2
     ORDER BY next_attempt_at
     LIMIT 1) AS next_at
FROM jsonb_array_elements_text($1::jsonb) AS c(value)
