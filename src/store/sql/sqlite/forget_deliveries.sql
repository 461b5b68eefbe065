-- Forgets the oldest ?2 deliveries noted before ?1 (those erase_tokens.sql has just erased, in
-- the same transaction) whose tokens are gone: erased, or their job deleted. One whose token is
-- still held (noted since, or not yet reached by the erasure) stays for the next batch.
DELETE FROM token_deliveries
WHERE id IN (SELECT id FROM token_deliveries
             WHERE delivered_at <= ?1
             ORDER BY delivered_at, id
             LIMIT ?2)
  AND NOT EXISTS (SELECT 1 FROM jobs
                  WHERE jobs.id = token_deliveries.id AND jobs.access_token IS NOT NULL)
