-- Turns a time range [?1, ?2) into a seq range (also retention's: the range of events older
-- than its cutoff, from i64::MIN), by bisecting the chain on seq, without an index on the
-- events' time (which every event would pay for when written): event times never decrease
-- along the chain (the writer makes them monotonic), so whether the first event at or after
-- seq s is at or after a time t turns true once as s grows, and stays true. One bisection per
-- end, a few dozen primary-key lookups each, finds the first seq where it is true for that
-- end. The range is exact: its first event is the first at or after ?1, its last the last
-- before ?2. The one exception to the order is the first event when it is a retention
-- checkpoint (it carries the time retention ran, later than the events kept after it): the
-- range starts there whenever its time is at or after ?1 (the listing filters on the time as
-- well); the bisections look at it only where the events after it agree.
WITH RECURSIVE
    -- Two subqueries: each reads one end of the primary key (one MIN and one MAX in a single
    -- SELECT would read every row).
    span(first, past) AS (
        SELECT (SELECT MIN(seq) FROM audit_events), (SELECT MAX(seq) FROM audit_events) + 1
    ),
    ends(side, t) AS (SELECT 0, ?1 UNION ALL SELECT 1, ?2),
    search(side, t, lo, hi) AS (
        SELECT side, t, first, past FROM span, ends WHERE first IS NOT NULL
        UNION ALL
        SELECT side, t,
               CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= t
                    THEN lo ELSE (lo + hi) / 2 + 1 END,
               CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= t
                    THEN (lo + hi) / 2 ELSE hi END
        FROM search WHERE lo < hi
    ),
    found(side, seq) AS (SELECT side, lo FROM search WHERE lo >= hi)
SELECT CASE WHEN (SELECT at FROM audit_events WHERE seq = (SELECT first FROM span)) >= ?1
            THEN (SELECT first FROM span)
            ELSE (SELECT seq FROM audit_events
                  WHERE seq >= (SELECT seq FROM found WHERE side = 0)
                  ORDER BY seq LIMIT 1)
       END AS lo,
       (SELECT seq FROM audit_events WHERE seq < (SELECT seq FROM found WHERE side = 1)
        ORDER BY seq DESC LIMIT 1) AS hi
