INSERT INTO audit_checkpoints (seq, hash, at, prev_signature, key_id, signature)
VALUES ($1, $2, $3, $4, $5, $6)
