UPDATE jobs SET code = $2, code_verifier = $3, access_token = $4 WHERE id = $1
