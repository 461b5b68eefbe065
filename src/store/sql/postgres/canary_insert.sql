INSERT INTO key_canaries (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING
