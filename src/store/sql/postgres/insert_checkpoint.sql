INSERT INTO audit_events (seq, at, job_id, tenant, client_id, kind, attempt, http_status, detail,
                          code_fingerprint, prev_hash, hash)
VALUES ($1, $2, '', '', '', 'audit.checkpoint', NULL, NULL, $3, NULL, $4, $4)
