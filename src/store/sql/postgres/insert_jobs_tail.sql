ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING id, job_id
