-- Jobs not yet terminal, counted as they change, so that admitting a submission reads a few
-- rows instead of counting the queue: the total, per tenant, per client id, and how many
-- client ids have any ('clients'). Kept by a trigger on every change of a job's state; the
-- writers of all replicas take turns (audit_chain's lock), so the counts never race.

CREATE TABLE queue_counts (
    scope   TEXT   NOT NULL CHECK (scope IN ('total', 'clients', 'tenant', 'client')),
    key     TEXT   NOT NULL,
    pending BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE FUNCTION jobs_count_pending() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_pending BOOLEAN := TG_OP = 'UPDATE'
        AND OLD.state IN ('queued', 'retry_wait', 'running');
    is_pending  BOOLEAN := NEW.state IN ('queued', 'retry_wait', 'running');
    delta       BIGINT;
    client_now  BIGINT;
BEGIN
    IF was_pending = is_pending THEN
        RETURN NULL;
    END IF;
    delta := CASE WHEN is_pending THEN 1 ELSE -1 END;
    INSERT INTO queue_counts (scope, key, pending) VALUES ('total', '', delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    INSERT INTO queue_counts (scope, key, pending) VALUES ('tenant', NEW.tenant, delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    INSERT INTO queue_counts (scope, key, pending) VALUES ('client', NEW.client_id, delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta
        RETURNING pending INTO client_now;
    -- A client id that gained its first pending job, or lost its last.
    IF (delta = 1 AND client_now = 1) OR (delta = -1 AND client_now = 0) THEN
        INSERT INTO queue_counts (scope, key, pending) VALUES ('clients', '', delta)
            ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    END IF;
    IF client_now = 0 THEN
        DELETE FROM queue_counts WHERE scope = 'client' AND key = NEW.client_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_count_pending
    AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_pending();

-- The jobs already there.
INSERT INTO queue_counts (scope, key, pending)
SELECT 'tenant', tenant, COUNT(*) FROM jobs
WHERE state IN ('queued', 'retry_wait', 'running') GROUP BY tenant;
INSERT INTO queue_counts (scope, key, pending)
SELECT 'client', client_id, COUNT(*) FROM jobs
WHERE state IN ('queued', 'retry_wait', 'running') GROUP BY client_id;
INSERT INTO queue_counts (scope, key, pending)
SELECT 'total', '', COUNT(*) FROM jobs WHERE state IN ('queued', 'retry_wait', 'running');
INSERT INTO queue_counts (scope, key, pending)
SELECT 'clients', '', COUNT(*) FROM queue_counts WHERE scope = 'client';
