UPDATE audit_chain SET last_seq = $1 WHERE id = 1 AND last_seq < $1
