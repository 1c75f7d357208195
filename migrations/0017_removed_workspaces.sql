-- Removed workspaces (tombstones) leave the hot table (issue 15). With 1M tombstones beside
-- 100k live workspaces in `workspaces`, partial indexes were not enough: /fleet cost 2.6x,
-- the liveness sweep 2.2x, list pages 1.5x and /metrics 1.4x what they cost without them.
-- A tombstone now lives in `removed_workspaces` until the pruner deletes it: it answers 410
-- for its token and 409 for changes, shows in `?status=removed` / `include_removed` lists and
-- `GET /workspaces/{id}`, and no longer holds its name.
--
-- 1. The table: the same columns as `workspaces`, in the same order, so a row moves with
--    `SELECT *` (a later column added to `workspaces` must be added here too, and the view
--    below recreated: the move then fails loudly until it is, and tests/test_migrations.py
--    checks both tables agree). Its indexes serve what tombstones are read for: by id (the
--    primary key), by token (410 instead of 401), oldest removal first (the pruner).
CREATE TABLE removed_workspaces (LIKE workspaces INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE removed_workspaces ADD PRIMARY KEY (id);
-- Lets the planner leave the table out of a list whose status filter cannot match it
-- (constraint_exclusion = partition covers UNION ALL views).
ALTER TABLE removed_workspaces ADD CONSTRAINT removed_workspaces_removed_check
    CHECK (status = 'removed');
CREATE INDEX removed_workspaces_token_idx ON removed_workspaces (token_hash);
CREATE INDEX removed_workspaces_previous_token_idx ON removed_workspaces (previous_token_hash)
    WHERE previous_token_hash IS NOT NULL;
CREATE INDEX removed_workspaces_removed_at_idx ON removed_workspaces (status_changed_at);

-- 2. History outlives its workspace until the tombstone is pruned: the foreign keys from
--    plugins, runs and actions to `workspaces` go (as the events' did in 0005), since their
--    rows now belong to a workspace in either table. The pruner deletes them with their
--    tombstone (registry/db/retention.py).
ALTER TABLE declared_plugins DROP CONSTRAINT declared_plugins_workspace_id_fkey;
ALTER TABLE installed_plugins DROP CONSTRAINT installed_plugins_workspace_id_fkey;
ALTER TABLE reconciles DROP CONSTRAINT reconciles_workspace_id_fkey;
ALTER TABLE workspace_actions DROP CONSTRAINT workspace_actions_workspace_id_fkey;

-- 3. Every workspace, live or removed: what reads by id, by name list or by token use when a
--    tombstone is an answer too. Each branch keeps its own indexes (a UNION ALL view is
--    flattened, so `id = $1` probes both primary keys, and `ORDER BY id` merges them).
CREATE VIEW all_workspaces AS
    SELECT * FROM workspaces
    UNION ALL
    SELECT * FROM removed_workspaces;

-- 4. The tombstone count of 0015 now follows `removed_workspaces`: one update per statement
--    that inserts or deletes tombstones, nothing at all on `workspaces`, so heartbeats and
--    status changes never run a count trigger.
DROP TRIGGER workspaces_tombstone_made ON workspaces;
DROP TRIGGER workspaces_tombstones_inserted ON workspaces;
DROP TRIGGER workspaces_tombstones_deleted ON workspaces;
DROP TRIGGER workspaces_truncated ON workspaces;
DROP FUNCTION tombstone_count_add();
DROP FUNCTION tombstone_count_inserted();
DROP FUNCTION tombstone_count_deleted();

CREATE FUNCTION tombstone_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tombstone_count SET n = n + (SELECT count(*) FROM inserted)
    WHERE EXISTS (SELECT 1 FROM inserted);
    RETURN NULL;
END $$;

CREATE FUNCTION tombstone_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tombstone_count SET n = n - (SELECT count(*) FROM deleted)
    WHERE EXISTS (SELECT 1 FROM deleted);
    RETURN NULL;
END $$;

CREATE TRIGGER removed_workspaces_inserted AFTER INSERT ON removed_workspaces
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION tombstone_count_inserted();
CREATE TRIGGER removed_workspaces_deleted AFTER DELETE ON removed_workspaces
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION tombstone_count_deleted();
CREATE TRIGGER removed_workspaces_truncated AFTER TRUNCATE ON removed_workspaces
    FOR EACH STATEMENT EXECUTE FUNCTION tombstone_count_reset();

-- 5. A workspace that becomes `removed` moves, in the statement that removed it, whatever
--    the writer (DELETE /workspaces/{id}, a test's UPDATE, a bulk load inserting tombstones).
--    WHEN keeps heartbeats' updates (which set status to what it was) free of the trigger.
--    The row's events were written by that statement already; the move writes none.
CREATE FUNCTION entomb_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO removed_workspaces SELECT NEW.*;
    DELETE FROM workspaces WHERE id = NEW.id;
    RETURN NULL;
END $$;

CREATE TRIGGER workspaces_entombed AFTER UPDATE OF status ON workspaces
    FOR EACH ROW WHEN (NEW.status = 'removed')
    EXECUTE FUNCTION entomb_updated();

CREATE FUNCTION entomb_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE status = 'removed') THEN
        INSERT INTO removed_workspaces SELECT * FROM inserted WHERE status = 'removed';
        DELETE FROM workspaces w USING inserted i WHERE w.id = i.id AND i.status = 'removed';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER workspaces_inserted_removed AFTER INSERT ON workspaces
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION entomb_inserted();

-- 6. The tombstones there are now move, and the indexes that kept them apart in
--    `workspaces` go: every row left there is live.
INSERT INTO removed_workspaces SELECT * FROM workspaces WHERE status = 'removed';
DELETE FROM workspaces WHERE status = 'removed';
UPDATE tombstone_count SET n = (SELECT count(*) FROM removed_workspaces);
DROP INDEX workspaces_removed_idx;
DROP INDEX workspaces_live_idx;
