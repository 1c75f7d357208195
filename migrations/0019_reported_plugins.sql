-- The runtime's report of its plugins leaves the hot row (issue 18: write only what changed).
--
-- Every heartbeat writes a new version of its workspace's row, and the WAL of that update
-- holds the whole new row but its unchanged prefix and suffix. A reported plugin list small
-- enough to stay inside the row (under ~2 KB: 20 plugins) sat between columns that change
-- every beat, so it was written again on every beat, changed or not: 1,967 B of WAL per beat
-- with 20 plugins against 203 B with none (docs/benchmarks.md, bench/wal.py). A larger list
-- was out of line (TOAST) and already kept by reference.
--
-- The list now lives in `reported_plugins`, one row per workspace that ever reported one,
-- written only when the report changes. What stays in the row is a digest of the list (32
-- bytes), so the heartbeat compares against the row it has locked: a statement waiting for
-- another beat of the same workspace then compares against what that beat stored (the row
-- lock re-reads the workspace row, not a joined one). The digest is of the list as jsonb
-- prints it, which does not depend on how the runtime spelled its JSON.

CREATE TABLE reported_plugins (
    -- No foreign key, like the other tables of a workspace's own (migration 0017): a
    -- tombstone keeps its last report until the pruner deletes both.
    workspace_id uuid PRIMARY KEY,
    plugins      jsonb NOT NULL,
    -- When the report last changed: a mismatch with the records is drift only once the
    -- report has stood still a while (registry/drift.py).
    changed_at   timestamptz NOT NULL
);

INSERT INTO reported_plugins (workspace_id, plugins, changed_at)
SELECT id, observed_plugins, COALESCE(observed_plugins_at, last_heartbeat_at, now())
FROM workspaces WHERE observed_plugins IS NOT NULL
UNION ALL
SELECT id, observed_plugins, COALESCE(observed_plugins_at, last_heartbeat_at, now())
FROM removed_workspaces WHERE observed_plugins IS NOT NULL;

-- plugins_sync (migration 0016) reads the report: a changed one marks its workspace, as the
-- trigger on the old column did, whoever the writer. Unchanged reports write nothing here,
-- so run no trigger.
CREATE TRIGGER reported_plugins_sync AFTER INSERT OR UPDATE OR DELETE ON reported_plugins
    FOR EACH ROW EXECUTE FUNCTION plugins_sync_mark();

-- The old columns stay, empty, until a later migration drops them: during a rolling upgrade
-- the processes of the previous release still write them (their heartbeat statement names
-- them), and must not fail. This release's statement empties them in every row it beats, so a
-- copy an older process wrote leaves the hot row at that workspace's next beat; the old
-- trigger (still marking plugins_sync when an older process changes the column) is off while
-- this migration empties them, which changes no report.
ALTER TABLE workspaces ADD COLUMN reported_plugins_digest bytea;
ALTER TABLE removed_workspaces ADD COLUMN reported_plugins_digest bytea;
ALTER TABLE workspaces DISABLE TRIGGER workspaces_plugins_sync_observed;
UPDATE workspaces
SET reported_plugins_digest = sha256(convert_to(observed_plugins::text, 'UTF8')),
    observed_plugins = NULL, observed_plugins_at = NULL
WHERE observed_plugins IS NOT NULL;
ALTER TABLE workspaces ENABLE TRIGGER workspaces_plugins_sync_observed;
UPDATE removed_workspaces
SET reported_plugins_digest = sha256(convert_to(observed_plugins::text, 'UTF8')),
    observed_plugins = NULL, observed_plugins_at = NULL
WHERE observed_plugins IS NOT NULL;

-- Both tables keep the same columns in the same order (migration 0017); the view over them
-- is made again for the new one.
DROP VIEW all_workspaces;
CREATE VIEW all_workspaces AS
    SELECT * FROM workspaces
    UNION ALL
    SELECT * FROM removed_workspaces;
