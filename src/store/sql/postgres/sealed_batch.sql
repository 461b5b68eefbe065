SELECT id, job_id, code, code_verifier, access_token FROM jobs
WHERE id > $1 AND (code IS NOT NULL OR code_verifier IS NOT NULL OR access_token IS NOT NULL)
ORDER BY id
LIMIT $2
-- Locked, so that a token erased meanwhile (erasure runs outside the writers' turns) is not
-- written back re-sealed.
FOR UPDATE
