INSERT INTO audit_events (at, job_id, tenant, client_id, kind, attempt, http_status, detail)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
