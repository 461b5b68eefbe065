-- list_jobs_by_client.sql, newest first: ids in (?1, ?2], the page continues below its last id.
SELECT * FROM jobs
WHERE client_id = ?5 AND id > ?1 AND id <= ?2 AND created_at >= ?3 AND created_at < ?4
  AND (?6 IS NULL OR tenant = ?6)
  AND (?7 IS NULL OR state = ?7)
  AND (?8 IS NULL OR code_fingerprint = ?8)
  AND (?10 IS NULL OR failure_reason = ?10)
ORDER BY id DESC
LIMIT ?9
