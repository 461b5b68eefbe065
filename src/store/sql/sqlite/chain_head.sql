SELECT seq, at, hash FROM audit_events ORDER BY seq DESC LIMIT 1
