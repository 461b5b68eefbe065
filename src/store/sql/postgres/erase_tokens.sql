UPDATE jobs SET access_token = NULL, version = version + 1, updated_at = $1
WHERE id IN (SELECT id FROM jobs
             WHERE access_token IS NOT NULL AND token_expires_at <= $1
             LIMIT $3)
   OR id IN (SELECT id FROM jobs
             WHERE access_token IS NOT NULL AND token_delivered_at IS NOT NULL
               AND token_delivered_at <= $2
             LIMIT $3)
RETURNING id
