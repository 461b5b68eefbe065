SELECT (SELECT id FROM jobs WHERE created_at >= $1 ORDER BY created_at, id LIMIT 1) AS lo,
       (SELECT id FROM jobs WHERE created_at < $2 ORDER BY created_at DESC, id DESC LIMIT 1) AS hi
