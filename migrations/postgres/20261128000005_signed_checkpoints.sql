-- Signed checkpoints of the audit chain: see migrations/sqlite/20261128000005_signed_checkpoints.sql.
-- Written inside a writer's turn (audit_chain's row locked), so replicas chain them in order.

CREATE TABLE audit_checkpoints (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq            BIGINT NOT NULL,
    hash           TEXT   NOT NULL,
    at             BIGINT NOT NULL,
    prev_signature TEXT,
    key_id         TEXT   NOT NULL,
    signature      TEXT   NOT NULL
);

CREATE INDEX audit_checkpoints_at ON audit_checkpoints (at);
