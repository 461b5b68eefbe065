SELECT (SELECT MAX(seq) FROM audit_events WHERE at < $1) AS last_old,
       (SELECT MIN(seq) FROM audit_events) AS first
