-- plugins_sync stored, so `GET /workspaces?plugins_sync=` and /metrics read it by index
-- instead of judging the fleet page by page (issue 14: 100 ms at 100k for a rare state).
--
-- The value is derived by the one derivation, registry/verdicts.py, in Python: SQL does not
-- repeat the rule. What SQL guarantees is that no change goes unnoticed: every change to
-- what the derivation reads (runs, installed and declared plugins, restart actions, the
-- runtime's report of its plugins) marks the workspace in `plugins_sync_dirty`, in the same
-- transaction, whoever the writer is; registry/sync_state.py then judges the marked
-- workspaces again and clears their marks. A stored value is exact for a workspace that has
-- no mark; readers treat marked ones (and NULL: never judged) as unknown.
--
-- The marks are plain inserts: no unique key, no foreign key, so a trigger never waits on a
-- lock (a run made queued must not then lock its workspace row: see LOCK_RUN_WORKSPACE in
-- registry/db/reconciles.py) and a marked workspace may be marked twice.

ALTER TABLE workspaces ADD COLUMN plugins_sync text
    CHECK (plugins_sync IN ('synced', 'out_of_sync', 'reconciling', 'failed'));

-- Rare states are read by index (and sorted by id, the list's keyset order: they are few);
-- counts by status and sync read this index alone (an index-only scan: 88 pages at 100k
-- instead of the table's 6,900). Heartbeats write none of these columns: their updates stay HOT.
CREATE INDEX workspaces_plugins_sync_idx ON workspaces (plugins_sync, status, id);

CREATE TABLE plugins_sync_dirty (
    workspace_id uuid NOT NULL
);
-- The refresher takes every mark of the workspaces it judges at once.
CREATE INDEX plugins_sync_dirty_workspace_idx ON plugins_sync_dirty (workspace_id);

-- Existing workspaces: every one is judged once by the registry after this migration (the
-- backfill runs in batches in the background of `registry serve`; until a workspace is
-- judged, its stored value is NULL and readers judge it themselves).
INSERT INTO plugins_sync_dirty (workspace_id) SELECT id FROM workspaces;

CREATE FUNCTION plugins_sync_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO plugins_sync_dirty (workspace_id) VALUES (OLD.workspace_id);
    ELSE
        INSERT INTO plugins_sync_dirty (workspace_id) VALUES (NEW.workspace_id);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION plugins_sync_mark_workspace() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO plugins_sync_dirty (workspace_id) VALUES (NEW.id);
    RETURN NULL;
END $$;

-- A new workspace (with no plugins it is synced: still judged, not assumed).
CREATE TRIGGER workspaces_plugins_sync_new AFTER INSERT ON workspaces
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark_workspace();

-- The runtime's report changed. The WHEN clause is tested in C: a heartbeat that reports what
-- it reported before (the common case) runs no function and writes nothing more.
CREATE TRIGGER workspaces_plugins_sync_observed AFTER UPDATE OF observed_plugins ON workspaces
    FOR EACH ROW WHEN (OLD.observed_plugins IS DISTINCT FROM NEW.observed_plugins)
    EXECUTE FUNCTION plugins_sync_mark_workspace();

CREATE TRIGGER declared_plugins_sync AFTER INSERT OR UPDATE OR DELETE ON declared_plugins
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark();

CREATE TRIGGER installed_plugins_sync AFTER INSERT OR UPDATE OR DELETE ON installed_plugins
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark();

-- A new run (it is the latest) and a run's change of status or of its withheld restart. A
-- deleted run is never a workspace's latest (retention keeps it) unless the workspace goes.
CREATE TRIGGER reconciles_sync_new AFTER INSERT ON reconciles
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark();

CREATE TRIGGER reconciles_sync_changed AFTER UPDATE OF status, restart_withheld ON reconciles
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.restart_withheld IS DISTINCT FROM NEW.restart_withheld)
    EXECUTE FUNCTION plugins_sync_mark();

-- A restart asked for, or acknowledged (handing it out changes nothing the derivation reads).
-- Deleted actions are acknowledged ones (retention), which no longer count.
CREATE TRIGGER workspace_actions_sync_new AFTER INSERT ON workspace_actions
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark();

CREATE TRIGGER workspace_actions_sync_acked AFTER UPDATE OF acked_at, type ON workspace_actions
    FOR EACH ROW WHEN (OLD.acked_at IS DISTINCT FROM NEW.acked_at OR OLD.type <> NEW.type)
    EXECUTE FUNCTION plugins_sync_mark();
