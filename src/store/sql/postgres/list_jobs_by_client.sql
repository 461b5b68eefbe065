SELECT * FROM jobs
WHERE client_id = $5 AND id > $1 AND id <= $2 AND created_at >= $3 AND created_at < $4
  AND ($6::text IS NULL OR tenant = $6)
  AND ($7::text IS NULL OR state = $7)
  AND ($8::text IS NULL OR code_fingerprint = $8)
  AND ($10::text IS NULL OR failure_reason = $10)
ORDER BY id
LIMIT $9
