-- Whether a client has any job waiting (due or not), through jobs_client_due.
SELECT EXISTS (SELECT 1 FROM jobs WHERE client_id = ?1 AND state IN ('queued', 'retry_wait'))
