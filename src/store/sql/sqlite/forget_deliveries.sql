-- Forgets the deliveries erase_tokens.sql looked at (the oldest ?2 before ?1) whose tokens are
-- gone: erased, or their job deleted. One whose token is still held (noted since) stays for
-- the next sweep.
DELETE FROM token_deliveries
WHERE id IN (SELECT id FROM token_deliveries
             WHERE delivered_at <= ?1
             ORDER BY delivered_at, id
             LIMIT ?2)
  AND NOT EXISTS (SELECT 1 FROM jobs
                  WHERE jobs.id = token_deliveries.id AND jobs.access_token IS NOT NULL)
