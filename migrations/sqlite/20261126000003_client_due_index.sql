-- Claiming walks each waiting client's jobs in TTL order, so that a deep backlog for one
-- (rate-limited) client costs nothing when claiming for another.
CREATE INDEX jobs_client_due ON jobs (client_id, expires_at)
    WHERE state IN ('queued', 'retry_wait');
