SELECT * FROM audit_events
WHERE job_id = $5 AND seq > $1 AND seq <= $2 AND at >= $3 AND at < $4
  AND ($6::text IS NULL OR client_id = $6)
ORDER BY seq
LIMIT $7
