-- Turns a time range into a seq range through the audit_events_at index. Event times never
-- decrease along the chain (the writer makes them monotonic), so the range is exact.
SELECT (SELECT seq FROM audit_events WHERE at >= ?1 ORDER BY at, seq LIMIT 1) AS lo,
       (SELECT seq FROM audit_events WHERE at < ?2 ORDER BY at DESC, seq DESC LIMIT 1) AS hi
