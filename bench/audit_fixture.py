#!/usr/bin/env python3
"""Builds a database with N audit events (default 1,000,000) for timing the auditors' queries.

The events are shaped like real ones but their hashes are placeholders: the fixture measures
paging and export, not verification. Usage: bench/audit_fixture.py PATH [N]
"""
import os
import sqlite3
import sys
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
path = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
for suffix in ("", "-wal", "-shm"):
    if os.path.exists(path + suffix):
        os.remove(path + suffix)
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
for name in sorted(os.listdir(os.path.join(root, "migrations", "sqlite"))):
    with open(os.path.join(root, "migrations", "sqlite", name)) as migration:
        db.executescript(migration.read())
started = time.time()
base = 1_700_000_000_000
db.execute("BEGIN")
db.executemany(
    "INSERT INTO audit_events (seq, at, job_id, tenant, client_id, kind, attempt, http_status,"
    " detail, code_fingerprint, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
    (
        (seq, base + seq * 10, f"job-{seq // 4}", "default", f"client-{seq % 50}",
         "attempt.finished", 1, 200, "upstream answered 200", "f" * 64, "0" * 64, "0" * 64)
        for seq in range(1, count + 1)
    ),
)
db.execute("COMMIT")
print(f"{count} events written to {path} in {time.time() - started:.1f} s")
