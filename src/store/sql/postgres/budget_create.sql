-- Creates the rate budget rows of the keys in $1 (a JSON array, sorted so that two replicas
-- creating the same keys wait on each other in the same order); a row of zeros is a fresh
-- budget.
INSERT INTO rate_budget (key, tat_us, effective_rps)
SELECT key, 0, 0 FROM jsonb_array_elements_text($1::jsonb) AS k(key)
ON CONFLICT (key) DO NOTHING
