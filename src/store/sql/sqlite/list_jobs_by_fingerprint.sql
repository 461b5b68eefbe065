-- list_jobs.sql for one code. No index on fingerprints (every submission would pay for it):
-- this reads the jobs of the id and time range, about 0.3 s per million.
SELECT * FROM jobs
WHERE code_fingerprint = ?8 AND id > ?1 AND id <= ?2 AND created_at >= ?3 AND created_at < ?4
  AND (?5 IS NULL OR client_id = ?5)
  AND (?6 IS NULL OR tenant = ?6)
  AND (?7 IS NULL OR state = ?7)
  AND (?10 IS NULL OR failure_reason = ?10)
ORDER BY id
LIMIT ?9
