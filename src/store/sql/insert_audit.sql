INSERT INTO audit_events (seq, at, job_id, tenant, client_id, kind, attempt, http_status, detail,
                          code_fingerprint, prev_hash, hash)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
