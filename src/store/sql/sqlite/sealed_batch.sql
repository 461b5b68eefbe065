-- The next jobs holding sealed secrets after row ?1, for re-encryption.
SELECT id, job_id, code, code_verifier, access_token FROM jobs
WHERE id > ?1 AND (code IS NOT NULL OR code_verifier IS NOT NULL OR access_token IS NOT NULL)
ORDER BY id
LIMIT ?2
