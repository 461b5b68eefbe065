UPDATE key_canaries SET value = $2 WHERE name = $1
