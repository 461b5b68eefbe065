-- What a batch that submits reads at the start of its turn, in one round trip (each statement
-- is one): the counts its submissions are admitted against (kept by the counting triggers on
-- jobs: the total, the client ids with pending jobs, and those of the tenants in $1 and the
-- client ids in $2, JSON arrays); a 'waiting' row if any job of any replica waits (queued, or
-- for a retry: a submission starts its first attempt at once only if none does; read from the
-- partial index of waiting jobs); and the audit chain's head ('head': key the hash, pending the
-- sequence number, at its time), absent while the chain is empty.
SELECT scope, key, pending, NULL::bigint AS at FROM queue_counts
WHERE scope IN ('total', 'clients')
   OR (scope = 'tenant' AND key IN (SELECT jsonb_array_elements_text($1::jsonb)))
   OR (scope = 'client' AND key IN (SELECT jsonb_array_elements_text($2::jsonb)))
UNION ALL
SELECT 'waiting', '', 1, NULL
WHERE EXISTS (SELECT 1 FROM jobs WHERE state IN ('queued', 'retry_wait'))
UNION ALL
(SELECT 'head', hash, seq, at FROM audit_events ORDER BY seq DESC LIMIT 1)
