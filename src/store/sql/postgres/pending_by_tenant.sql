SELECT tenant, COUNT(*) AS pending FROM jobs
WHERE state IN ('queued', 'retry_wait', 'running')
GROUP BY tenant
