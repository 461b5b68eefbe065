-- Erases tokens that expired ($1: now) or were delivered more than the retention ago ($2),
-- each found through its own index, at most $3 of each (the oldest deliveries first;
-- forget_deliveries.sql then forgets those whose tokens are gone). In the order of those
-- indexes: without statistics (a young database) the planner would expect most held tokens
-- to match and read the whole table for the first $3, where the index stops at the first
-- entry past the bound.
UPDATE jobs SET access_token = NULL, version = version + 1, updated_at = $1
WHERE access_token IS NOT NULL
  AND id = ANY (ARRAY(
    (SELECT id FROM jobs
     WHERE access_token IS NOT NULL AND token_expires_at <= $1
     ORDER BY token_expires_at
     LIMIT $3)
    UNION
    (SELECT id FROM token_deliveries
     WHERE delivered_at <= $2
     ORDER BY delivered_at, id
     LIMIT $3)))
RETURNING id
