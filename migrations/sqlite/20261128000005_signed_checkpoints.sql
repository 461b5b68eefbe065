-- Signed checkpoints of the audit chain (src/audit/checkpoint.rs): the chain head (seq, hash)
-- signed with an Ed25519 key the database never holds, each chained to the one before by its
-- signature. A copy of each also goes to the log pipeline; `audit verify --public-key` checks
-- these rows and those copies against the chain.

CREATE TABLE audit_checkpoints (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    seq            INTEGER NOT NULL,   -- the last event covered
    hash           TEXT    NOT NULL,   -- that event's hash
    at             INTEGER NOT NULL,   -- signing time, ms since the Unix epoch
    prev_signature TEXT,               -- the previous checkpoint's signature; NULL for the first
    key_id         TEXT    NOT NULL,   -- which public key verifies it
    signature      TEXT    NOT NULL    -- Ed25519, hex
);

CREATE INDEX audit_checkpoints_at ON audit_checkpoints (at);
