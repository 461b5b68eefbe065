SELECT client_id, COUNT(*) AS pending FROM jobs
WHERE state IN ('queued', 'retry_wait', 'running')
GROUP BY client_id
