SELECT * FROM audit_events
WHERE seq > $1 AND seq <= $2 AND at >= $3 AND at < $4
  AND ($5::text IS NULL OR job_id = $5)
  AND ($6::text IS NULL OR client_id = $6)
ORDER BY seq
LIMIT $7
