-- Tokens are erased once delivered (after a retention) or expired, whichever comes first.
ALTER TABLE jobs ADD COLUMN token_delivered_at INTEGER;

CREATE INDEX jobs_token_held ON jobs (token_expires_at) WHERE access_token IS NOT NULL;
