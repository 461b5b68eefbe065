-- Taken first by every writing transaction and held to its commit: one writer at a time across
-- replicas, so the audit chain grows in commit order and the queue bounds count every replica.
SELECT last_seq FROM audit_chain WHERE id = 1 FOR UPDATE
