-- The last checkpoint's row: a verification checks the checkpoints up to it.
SELECT MAX(id) AS id FROM audit_checkpoints
