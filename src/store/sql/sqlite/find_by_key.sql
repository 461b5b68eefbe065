SELECT * FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2
