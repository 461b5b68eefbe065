-- The last event older than the retention cutoff $1, and the first event of the table. The
-- last old one is found by bisecting the chain on seq, as `event_seq_bounds.sql` does (event
-- times never decrease along it; no index on the time).
WITH RECURSIVE
    -- Two subqueries: each reads one end of the primary key (one MIN and one MAX in a single
    -- SELECT would read every row).
    span(first, past) AS (
        SELECT (SELECT MIN(seq) FROM audit_events), (SELECT MAX(seq) FROM audit_events) + 1
    ),
    cut(lo, hi) AS (
        SELECT first, past FROM span WHERE first IS NOT NULL
        UNION ALL
        SELECT CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $1
                    THEN lo ELSE (lo + hi) / 2 + 1 END,
               CASE WHEN (SELECT at FROM audit_events WHERE seq >= (lo + hi) / 2
                          ORDER BY seq LIMIT 1) >= $1
                    THEN (lo + hi) / 2 ELSE hi END
        FROM cut WHERE lo < hi
    )
SELECT (SELECT seq FROM audit_events WHERE seq < (SELECT lo FROM cut WHERE lo >= hi)
        ORDER BY seq DESC LIMIT 1) AS last_old,
       (SELECT first FROM span) AS first
