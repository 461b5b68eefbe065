-- A token's first delivery is noted in a table of its own instead of on the job's row: a
-- narrow row appended in delivery order, where updating the job's row rewrote it and, on
-- PostgreSQL, added an entry to every index on jobs (the column was indexed, so the update
-- could not be a HOT one) once more per exchange. Retention erases tokens delivered longer
-- ago than it keeps them through this table's index, and forgets the deliveries it has erased.
CREATE TABLE token_deliveries (
    id           INTEGER PRIMARY KEY,   -- the job's id (jobs.id)
    delivered_at INTEGER NOT NULL       -- the first delivery, ms since the Unix epoch
);
CREATE INDEX token_deliveries_at ON token_deliveries (delivered_at);

-- Deliveries already noted, for the tokens still held.
INSERT INTO token_deliveries (id, delivered_at)
SELECT id, token_delivered_at FROM jobs
WHERE access_token IS NOT NULL AND token_delivered_at IS NOT NULL;

DROP INDEX jobs_token_delivered;
ALTER TABLE jobs DROP COLUMN token_delivered_at;
