SELECT (created_at / $10) * $10 AS bucket, state, COUNT(*) AS jobs FROM jobs
WHERE id > $1 AND id <= $2 AND created_at >= $3 AND created_at < $4
  AND ($5::text IS NULL OR client_id = $5)
  AND ($6::text IS NULL OR tenant = $6)
  AND ($7::text IS NULL OR state = $7)
  AND ($8::text IS NULL OR code_fingerprint = $8)
  AND ($9::text IS NULL OR failure_reason = $9)
GROUP BY bucket, state
ORDER BY bucket
