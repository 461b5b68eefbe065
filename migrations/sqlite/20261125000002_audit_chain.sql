-- The audit trail becomes a hash chain with code fingerprints, and gains the indexes that the
-- auditors' queries (time ranges, one client, one job, one code) page through.

ALTER TABLE jobs ADD COLUMN code_fingerprint TEXT;       -- HMAC-SHA256 of the code

ALTER TABLE audit_events ADD COLUMN code_fingerprint TEXT;
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;      -- hash of the event before
ALTER TABLE audit_events ADD COLUMN hash TEXT;           -- see src/audit.rs

CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_client ON audit_events (client_id, seq);

CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_client ON jobs (client_id, id);
CREATE INDEX jobs_fingerprint ON jobs (code_fingerprint);
