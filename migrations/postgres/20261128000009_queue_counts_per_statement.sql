-- queue_counts follow the jobs per statement instead of per row: a statement's changed rows
-- (its transition tables) are summed by tenant and client id, and each count is changed once.
-- The row trigger ran three or four upserts for every job inserted and every job finished,
-- about half of PostgreSQL's time for a batch of outcomes. What the counts follow is
-- unchanged: every insert, update and deletion, whoever makes it.
--
-- A trigger with transition tables fires on one event only, and an UPDATE trigger with them
-- cannot name columns: three triggers, the UPDATE one for every update (it finds nothing to
-- count when no state, tenant or client id changed).

-- Adds `deltas` (by tenant and client id, each pair once) to the counts.
CREATE FUNCTION queue_counts_add(tenants TEXT[], clients TEXT[], deltas BIGINT[])
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
    END IF;
    INSERT INTO queue_counts (scope, key, pending)
        SELECT 'tenant', t, SUM(d) FROM unnest(tenants, deltas) AS u(t, d)
        GROUP BY t HAVING SUM(d) <> 0
        ON CONFLICT (scope, key) DO UPDATE SET pending = queue_counts.pending + EXCLUDED.pending;
    -- Each client id's count after the change, and before it (after less the delta): those
    -- that gained their first pending job or lost their last change the 'clients' count, and
    -- a client id left with none loses its row.
    WITH per_client AS (
        SELECT c, SUM(d) AS delta FROM unnest(clients, deltas) AS u(c, d)
        GROUP BY c HAVING SUM(d) <> 0
    ), changed AS (
        INSERT INTO queue_counts (scope, key, pending)
            SELECT 'client', c, delta FROM per_client
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

CREATE FUNCTION jobs_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue_counts_add(array_agg(tenant), array_agg(client_id), array_agg(delta))
    FROM (SELECT tenant, client_id, COUNT(*) AS delta FROM added
          WHERE state IN ('queued', 'retry_wait', 'running')
          GROUP BY tenant, client_id) AS c;
    RETURN NULL;
END;
$$;

CREATE FUNCTION jobs_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue_counts_add(array_agg(tenant), array_agg(client_id), array_agg(delta))
    FROM (SELECT tenant, client_id, SUM(delta) AS delta FROM (
              SELECT tenant, client_id, 1 AS delta FROM after_change
              WHERE state IN ('queued', 'retry_wait', 'running')
              UNION ALL
              SELECT tenant, client_id, -1 FROM before_change
              WHERE state IN ('queued', 'retry_wait', 'running')
          ) AS rows
          GROUP BY tenant, client_id HAVING SUM(delta) <> 0) AS c;
    RETURN NULL;
END;
$$;

CREATE FUNCTION jobs_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue_counts_add(array_agg(tenant), array_agg(client_id), array_agg(-delta))
    FROM (SELECT tenant, client_id, COUNT(*) AS delta FROM removed
          WHERE state IN ('queued', 'retry_wait', 'running')
          GROUP BY tenant, client_id) AS c;
    RETURN NULL;
END;
$$;

DROP TRIGGER jobs_count_pending ON jobs;
DROP FUNCTION jobs_count_pending();
DROP FUNCTION queue_count(TEXT, TEXT, BIGINT);

CREATE TRIGGER jobs_count_inserted
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_inserted();
CREATE TRIGGER jobs_count_updated
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS before_change NEW TABLE AS after_change
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_updated();
CREATE TRIGGER jobs_count_deleted
    AFTER DELETE ON jobs REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_deleted();
