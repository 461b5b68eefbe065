-- A job's noted delivery goes with the job. On SQLite a deleted job's id can be taken again
-- (jobs.id is the rowid, without AUTOINCREMENT: deleting the newest job frees its id), and a
-- delivery left behind would then be read as the new job's: its token erased after the
-- retention though never delivered. The trigger holds whoever deletes the job (retention, or
-- an operator by hand, with or without foreign keys enforced).
CREATE TRIGGER token_deliveries_follow_jobs
    AFTER DELETE ON jobs
    FOR EACH ROW BEGIN
        DELETE FROM token_deliveries WHERE id = OLD.id;
    END;

-- Deliveries whose job is already gone.
DELETE FROM token_deliveries WHERE id NOT IN (SELECT id FROM jobs);
