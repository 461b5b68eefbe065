-- Statements that change the queue counts concurrently (edits by hand beside the daemon, whose
-- own writers take turns) take the counts' rows in one order: the total first, always, as the
-- row trigger before migration 9 did, so that they wait in line instead of deadlocking. Migration
-- 9's queue_counts_add skipped the total when its change was nought (a job moved between
-- tenants or client ids) and took the tenants' and client ids' rows in hash order.
CREATE OR REPLACE FUNCTION queue_counts_add(tenants TEXT[], clients TEXT[], deltas BIGINT[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    total_delta   BIGINT;
    clients_delta BIGINT;
    emptied       TEXT[];
BEGIN
    SELECT SUM(d) INTO total_delta FROM unnest(deltas) AS d;
    IF total_delta IS NULL THEN
        RETURN;
    END IF;
    IF total_delta <> 0 THEN
        INSERT INTO queue_counts (scope, key, pending) VALUES ('total', '', total_delta)
            ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + total_delta;
    ELSE
        PERFORM 1 FROM queue_counts WHERE scope = 'total' AND key = '' FOR UPDATE;
    END IF;
    INSERT INTO queue_counts (scope, key, pending)
        SELECT 'tenant', t, SUM(d) FROM unnest(tenants, deltas) AS u(t, d)
        GROUP BY t HAVING SUM(d) <> 0 ORDER BY t
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + EXCLUDED.pending;
    -- Each client id's count after the change, and before it (after less the delta): those
    -- that gained their first pending job or lost their last change the 'clients' count, and
    -- a client id left with none loses its row.
    WITH per_client AS (
        SELECT c, SUM(d) AS delta FROM unnest(clients, deltas) AS u(c, d)
        GROUP BY c HAVING SUM(d) <> 0
    ), changed AS (
        INSERT INTO queue_counts (scope, key, pending)
            SELECT 'client', c, delta FROM per_client ORDER BY c
            ON CONFLICT (scope, key) DO UPDATE
                SET pending = queue_counts.pending + EXCLUDED.pending
            RETURNING key, pending
    )
    SELECT COALESCE(SUM(CASE WHEN changed.pending > 0 AND changed.pending - per_client.delta <= 0
                             THEN 1
                             WHEN changed.pending <= 0 AND changed.pending - per_client.delta > 0
                             THEN -1
                             ELSE 0 END), 0),
           array_agg(changed.key) FILTER (WHERE changed.pending = 0)
    INTO clients_delta, emptied
    FROM changed JOIN per_client ON per_client.c = changed.key;
    IF clients_delta <> 0 THEN
        INSERT INTO queue_counts (scope, key, pending) VALUES ('clients', '', clients_delta)
            ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + clients_delta;
    END IF;
    IF emptied IS NOT NULL THEN
        DELETE FROM queue_counts WHERE scope = 'client' AND key = ANY (emptied);
    END IF;
END;
$$;
