-- queue_counts follow every change of a job that can move it: its state, its tenant or client
-- id (an operator's correction), its deletion (an operator's clean-up). The daemon itself
-- only inserts jobs and changes their state; the counts must not drift whoever edits the
-- table, or a bound would refuse submissions for good.

CREATE FUNCTION queue_count(tenant TEXT, client_id TEXT, delta BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    client_now BIGINT;
BEGIN
    INSERT INTO queue_counts (scope, key, pending) VALUES ('total', '', delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    INSERT INTO queue_counts (scope, key, pending) VALUES ('tenant', tenant, delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    INSERT INTO queue_counts (scope, key, pending) VALUES ('client', client_id, delta)
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta
        RETURNING pending INTO client_now;
    -- A client id that gained its first pending job, or lost its last.
    IF (delta = 1 AND client_now = 1) OR (delta = -1 AND client_now = 0) THEN
        INSERT INTO queue_counts (scope, key, pending) VALUES ('clients', '', delta)
            ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + delta;
    END IF;
    IF client_now = 0 THEN
        DELETE FROM queue_counts WHERE scope = 'client' AND key = client_id;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION jobs_count_pending() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_pending BOOLEAN := TG_OP IN ('UPDATE', 'DELETE')
        AND OLD.state IN ('queued', 'retry_wait', 'running');
    is_pending  BOOLEAN := TG_OP IN ('INSERT', 'UPDATE')
        AND NEW.state IN ('queued', 'retry_wait', 'running');
BEGIN
    -- The common case: a state change that leaves the job pending, or not, where it was.
    IF TG_OP = 'UPDATE' AND was_pending = is_pending
        AND OLD.tenant = NEW.tenant AND OLD.client_id = NEW.client_id THEN
        RETURN NULL;
    END IF;
    IF was_pending THEN
        PERFORM queue_count(OLD.tenant, OLD.client_id, -1);
    END IF;
    IF is_pending THEN
        PERFORM queue_count(NEW.tenant, NEW.client_id, 1);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER jobs_count_pending ON jobs;
CREATE TRIGGER jobs_count_pending
    AFTER INSERT OR UPDATE OF state, tenant, client_id OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_pending();
