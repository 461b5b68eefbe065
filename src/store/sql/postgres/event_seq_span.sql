-- The first and last stored seq (through the primary key).
SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM audit_events
