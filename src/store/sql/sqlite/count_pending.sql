-- Two counts so that each matches a partial index exactly.
SELECT (SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'retry_wait'))
     + (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS pending
