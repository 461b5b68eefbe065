-- Locks the rate budget rows of the keys in $1 in key order (no deadlock between replicas),
-- with the database's time once locked: every replica measures against the same clock.
SELECT key, tat_us, effective_rps, paused_until, last_throttled, last_recovery,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms
FROM rate_budget
WHERE key IN (SELECT jsonb_array_elements_text($1::jsonb))
ORDER BY key
FOR UPDATE
