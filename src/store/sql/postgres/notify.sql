-- Tells the other replicas about committed changes ($1: one payload per job). Delivered by
-- PostgreSQL at commit, never for a transaction that rolled back.
SELECT pg_notify('token_broker_jobs', payload)
FROM jsonb_array_elements_text($1::jsonb) AS p(payload)
