-- Whether any job of any replica waits (queued, or for a retry), from the partial index of
-- waiting jobs: a submission starts its first attempt at once only if none does. Read in the
-- writers' turn, so exact for the batch.
SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('queued', 'retry_wait'))
