-- Turns a time range [$1, $2) into a seq range by bisecting the chain on seq, without an
-- index on the events' time (which every event would pay for when written): event times never
-- decrease along the chain (the writer makes them monotonic), so whether the first event at or
-- after seq s is at or after a time t turns true once as s grows, and stays true. Each bisection
-- runs a few dozen primary-key lookups; `lower`'s ends at the first seq where it is true for
-- $1, `upper`'s for $2. The range is exact: its first event is the first at or after $1, its
-- last the last before $2. The one exception to the order is the first event when it is a
-- retention checkpoint (it carries the time retention ran, later than the events kept after
-- it): the range starts there whenever its time is at or after $1 (the listing filters on the
-- time as well); the bisections look at it only where the events after it agree.
WITH RECURSIVE
    -- Two subqueries: each reads one end of the primary key (one MIN and one MAX in a single
    -- SELECT would read every row).
    span(first, past) AS (
        SELECT (SELECT MIN(seq) FROM audit_events), (SELECT MAX(seq) FROM audit_events) + 1
    ),
    lower(lo, hi) AS (
        SELECT first, past FROM span WHERE first IS NOT NULL
        UNION ALL
        SELECT CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $1
                    THEN lo ELSE (lo + hi) / 2 + 1 END,
               CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $1
                    THEN (lo + hi) / 2 ELSE hi END
        FROM lower WHERE lo < hi
    ),
    upper(lo, hi) AS (
        SELECT first, past FROM span WHERE first IS NOT NULL
        UNION ALL
        SELECT CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $2
                    THEN lo ELSE (lo + hi) / 2 + 1 END,
               CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $2
                    THEN (lo + hi) / 2 ELSE hi END
        FROM upper WHERE lo < hi
    )
SELECT CASE WHEN (SELECT at FROM audit_events WHERE seq = (SELECT first FROM span)) >= $1
            THEN (SELECT first FROM span)
            ELSE (SELECT seq FROM audit_events WHERE seq >= (SELECT lo FROM lower WHERE lo >= hi)
                  ORDER BY seq LIMIT 1)
       END AS lo,
       (SELECT seq FROM audit_events WHERE seq < (SELECT lo FROM upper WHERE lo >= hi)
        ORDER BY seq DESC LIMIT 1) AS hi
