-- The tail of a WITH that a shared database's transaction runs before its commit
-- (`audit::insert_records_announcing`, which puts the transaction's last audit rows before
-- it, as "inserted AS (INSERT ...)", so that one round trip does all three): the chain's
-- high-water mark ($1: the last sequence number this transaction chained, so a cut tail
-- shows), and a notification per changed job to the other replicas ($2: a JSON array of
-- payloads), which PostgreSQL delivers at commit, never for a transaction that rolled back. (A
-- data-modifying WITH runs whether or not the query reads it.)
advanced AS (
    UPDATE audit_chain SET last_seq = $1 WHERE id = 1 AND last_seq < $1
)
SELECT pg_notify('token_broker_jobs', payload)
FROM jsonb_array_elements_text($2::jsonb) AS p(payload)
