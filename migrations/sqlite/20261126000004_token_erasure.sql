-- Tokens are erased once delivered (after a retention) or expired, whichever comes first. Each
-- condition has its own partial index, so the sweep visits only the tokens it erases.
ALTER TABLE jobs ADD COLUMN token_delivered_at INTEGER;

CREATE INDEX jobs_token_expiry ON jobs (token_expires_at) WHERE access_token IS NOT NULL;
CREATE INDEX jobs_token_delivered ON jobs (token_delivered_at)
    WHERE access_token IS NOT NULL AND token_delivered_at IS NOT NULL;
