-- The counts a run of submissions is admitted against (kept by the jobs_count_pending
-- trigger): the total, the client ids with pending jobs, and those of the tenants in $1 and
-- the client ids in $2 (JSON arrays).
SELECT scope, key, pending FROM queue_counts
WHERE scope IN ('total', 'clients')
   OR (scope = 'tenant' AND key IN (SELECT jsonb_array_elements_text($1::jsonb)))
   OR (scope = 'client' AND key IN (SELECT jsonb_array_elements_text($2::jsonb)))
