SELECT seq, hash, at, prev_signature, key_id, signature
FROM audit_checkpoints
ORDER BY id DESC
LIMIT 1
