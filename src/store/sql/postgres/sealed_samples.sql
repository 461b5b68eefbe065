-- The newest and the oldest jobs still holding sealed secrets.
(SELECT job_id, code, code_verifier, access_token FROM jobs
 WHERE code IS NOT NULL OR access_token IS NOT NULL ORDER BY id DESC LIMIT 1)
UNION ALL
(SELECT job_id, code, code_verifier, access_token FROM jobs
 WHERE code IS NOT NULL OR access_token IS NOT NULL ORDER BY id LIMIT 1)
