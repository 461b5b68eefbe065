SELECT c.value AS client_id,
    (SELECT MIN(next_attempt_at) FROM jobs
     WHERE client_id = c.value
       AND state IN ('queued', 'retry_wait')
       AND expires_at > $2) AS next_at
FROM jsonb_array_elements_text($1::jsonb) AS c(value)
