#!/usr/bin/env python3
"""Builds a database holding N queued jobs (default 1,000,000) for one client id, to measure
claiming, submitting, start-up and memory with a deep queue. The jobs use real migrations and
valid shapes; their codes are placeholders that upstream would refuse, sealed as the daemon
seals them (AES-256-GCM, src/security/crypto.rs) under a fresh key ring written to PATH.key.

Needs the `cryptography` package (pip install cryptography).
Usage: bench/queue_fixture.py PATH [N] [CLIENT_ID]
"""
import base64
import hashlib
import os
import sqlite3
import sys
import time
import uuid

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
path = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
client = sys.argv[3] if len(sys.argv) > 3 else "backlog-app"
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

key = os.urandom(32)
aead = AESGCM(key)


def seal(value, job_id, column):
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, value.encode(), f"token-broker/v1/{job_id}/{column}".encode())
    return "v1:k1:" + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()


for suffix in ("", "-wal", "-shm", ".key", ".audit-key"):
    if os.path.exists(path + suffix):
        os.remove(path + suffix)
with open(path + ".key", "w") as ring:
    ring.write(f"k1 {key.hex()}\n")
os.chmod(path + ".key", 0o600)
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute(
    "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,"
    " installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,"
    " checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)"
)
for name in sorted(os.listdir(os.path.join(root, "migrations", "sqlite"))):
    with open(os.path.join(root, "migrations", "sqlite", name), "rb") as migration:
        sql = migration.read()
    db.executescript(sql.decode())
    # Recorded as sqlx records them, so the daemon sees the schema as migrated.
    version, description = name.removesuffix(".sql").split("_", 1)
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)"
        " VALUES (?, ?, 1, ?, 0)",
        (int(version), description.replace("_", " "), hashlib.sha384(sql).digest()),
    )
started = time.time()
now = int(time.time() * 1000)
ttl = 10 * 365 * 86_400_000
db.execute("BEGIN")
db.executemany(
    "INSERT INTO jobs (job_id, tenant, client_id, idempotency_key, request_digest, code,"
    " code_verifier, state_param, state, created_at, updated_at, next_attempt_at, expires_at,"
    " code_fingerprint) VALUES (?,?,?,?,?,?,?,?,'queued',?,?,?,?,?)",
    (
        (job_id, "default", client, f"key-{n}", "d" * 64, seal(f"code-{n}", job_id, "code"),
         seal("v" * 64, job_id, "code_verifier"), "", now, now, now, now + ttl + n, "f" * 64)
        for n, job_id in ((n, str(uuid.uuid4())) for n in range(count))
    ),
)
db.execute("COMMIT")
db.close()
print(f"{count} queued jobs for {client} written to {path} in {time.time() - started:.1f} s")
