-- The head of a multi-row insert: the writer appends one "($n, ...)" tuple per event.
INSERT INTO audit_events (seq, at, job_id, tenant, client_id, kind, attempt, http_status, detail,
                          code_fingerprint, prev_hash, hash) VALUES
