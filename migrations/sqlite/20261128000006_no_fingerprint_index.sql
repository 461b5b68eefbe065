-- The hot path never reads jobs_fingerprint, and every new job wrote a page of it at a random
-- place in its submission's commit: under load about a quarter of the pages each commit wrote
-- (BENCHMARKS.md, issue 14). Searches by code fingerprint, an auditor's occasional question,
-- now read the jobs of the id and time range they ask about (about 0.3 s per million jobs).
DROP INDEX IF EXISTS jobs_fingerprint;
