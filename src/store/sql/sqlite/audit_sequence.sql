-- The highest seq ever assigned (AUTOINCREMENT keeps it even when rows are deleted).
SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'
