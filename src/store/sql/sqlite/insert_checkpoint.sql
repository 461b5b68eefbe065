-- Retention's checkpoint takes the seq and hash of the last removed event, so the next event's
-- prev_hash still matches and verification starts here.
INSERT INTO audit_events (seq, at, job_id, tenant, client_id, kind, attempt, http_status, detail,
                          code_fingerprint, prev_hash, hash)
VALUES (?1, ?2, '', '', '', 'audit.checkpoint', NULL, NULL, ?3, NULL, ?4, ?4)
