UPDATE jobs SET token_delivered_at = $2
WHERE job_id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))
  AND access_token IS NOT NULL
  AND token_delivered_at IS NULL
