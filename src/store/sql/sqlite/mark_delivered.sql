-- Notes the first delivery of each listed job's token (?1: a JSON array of job ids).
INSERT INTO token_deliveries (id, delivered_at)
SELECT id, ?2 FROM jobs
WHERE job_id IN (SELECT value FROM json_each(?1))
  AND access_token IS NOT NULL
ON CONFLICT (id) DO NOTHING
