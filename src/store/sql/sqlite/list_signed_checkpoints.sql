-- A page of checkpoints in the order they were signed: after row ?1, up to row ?4, signed at or after ?2.
SELECT id, seq, hash, at, prev_signature, key_id, signature
FROM audit_checkpoints
WHERE id > ?1 AND id <= ?4 AND at >= ?2
ORDER BY id
LIMIT ?3
