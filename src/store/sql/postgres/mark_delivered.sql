-- Notes the first delivery of each listed job's token ($1: a JSON array of job ids).
INSERT INTO token_deliveries (id, delivered_at)
SELECT id, $2 FROM jobs
WHERE job_id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))
  AND access_token IS NOT NULL
ON CONFLICT (id) DO NOTHING
