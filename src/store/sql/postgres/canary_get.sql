SELECT value FROM key_canaries WHERE name = $1
