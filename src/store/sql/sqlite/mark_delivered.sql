-- Notes the first delivery of each listed job's token (?1: a JSON array of job ids).
UPDATE jobs SET token_delivered_at = ?2
WHERE job_id IN (SELECT value FROM json_each(?1))
  AND access_token IS NOT NULL
  AND token_delivered_at IS NULL
