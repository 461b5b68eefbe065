-- The highest seq ever assigned (kept by the writers in audit_chain, even when rows are deleted).
SELECT last_seq AS seq FROM audit_chain WHERE id = 1
