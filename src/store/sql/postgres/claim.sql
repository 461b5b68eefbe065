-- Claims the chosen jobs ($1: a JSON array of row ids) in one statement, for lease owner $2
-- until $3 ($4: now, on the claiming replica's clock). A job another
-- replica holds is skipped rather than waited for; one cancelled, claimed or expired since it
-- was chosen is left alone.
UPDATE jobs
SET state = 'running', attempts = attempts + 1, lease_owner = $2,
    -- The lease runs on the database's clock, which every replica's rescue reads too.
    lease_expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + ($3 - $4),
    next_attempt_at = NULL, updated_at = $4, version = version + 1
WHERE id IN (SELECT id FROM jobs
             WHERE id = ANY (ARRAY(SELECT value::bigint FROM jsonb_array_elements_text($1::jsonb)))
               AND state IN ('queued', 'retry_wait')
               AND expires_at > $4
             FOR UPDATE SKIP LOCKED)
RETURNING *
