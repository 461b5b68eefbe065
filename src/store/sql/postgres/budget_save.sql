-- Writes back the rate budget states in $1 (a JSON array of rows).
UPDATE rate_budget AS b
SET tat_us = r.tat_us, effective_rps = r.effective_rps, paused_until = r.paused_until,
    last_throttled = r.last_throttled, last_recovery = r.last_recovery
FROM jsonb_to_recordset($1::jsonb) AS r(key text, tat_us bigint, effective_rps double precision,
                                        paused_until bigint, last_throttled bigint,
                                        last_recovery bigint)
WHERE b.key = r.key
