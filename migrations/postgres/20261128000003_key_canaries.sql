-- What every replica's keys must agree on: a value sealed with the encryption key ring and the
-- fingerprint of a fixed text. The first replica writes them; one whose keys differ refuses
-- to start, even before any secret is stored.
CREATE TABLE key_canaries (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
