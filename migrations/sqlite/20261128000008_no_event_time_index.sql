-- Every audit event added an entry to audit_events_at, about 6% of the pages each commit wrote
-- under load (BENCHMARKS.md, issue 14). Its only readers turned a time range into a seq range;
-- event times never decrease along the chain (the writer has always made them so), so they now
-- bisect the chain on seq through the primary key instead (`event_seq_bounds.sql`,
-- `prune_bound.sql`): a few dozen lookups per query.
DROP INDEX IF EXISTS audit_events_at;
