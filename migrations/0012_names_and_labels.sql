-- Names and labels (issue 14): a workspace's name is unique among the workspaces that are not
-- removed, so provisioning scripts can create by name and retry; labels are a small map the
-- list filters select on.

-- 1. Names created twice before this migration: the oldest (by created_at, then id) keeps
--    its name, every later one is renamed `<name>-duplicate-<its id>` (the id keeps it unique
--    and says which one it was). Deterministic, so every replica computes the same rename;
--    the README says so. Removed workspaces keep their names: a tombstone frees its name.
UPDATE workspaces AS w
SET name = left(w.name, 80) || '-duplicate-' || w.id::text
FROM (
    SELECT id, row_number() OVER (PARTITION BY name ORDER BY created_at, id) AS n
    FROM workspaces
    WHERE status <> 'removed'
) AS d
WHERE w.id = d.id AND d.n > 1;

-- The guarantee itself, and the lookup by name. Status is in the predicate, so a removal
-- (already a non-HOT update) frees the name; heartbeats touch neither column and stay HOT.
CREATE UNIQUE INDEX workspaces_live_name_idx ON workspaces (name) WHERE status <> 'removed';

-- 2. Name-prefix filters: a range scan on the byte order of the name (the default collation's
--    order cannot answer a prefix range).
CREATE INDEX workspaces_name_pattern_idx ON workspaces (name text_pattern_ops);

-- 3. Labels: a JSON object of string values (registry/labels.py bounds and checks them). The
--    GIN index answers the selector's `=` (@>), exists (?, ?&) and `in` key checks.
ALTER TABLE workspaces ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX workspaces_labels_idx ON workspaces USING gin (labels);

-- 4. "Has a failed reconcile": the failed runs are few, and the filter checks each one is
--    its workspace's latest (reconciles_workspace_idx).
CREATE INDEX reconciles_failed_idx ON reconciles (workspace_id) WHERE status = 'failed';

-- 5. "Has a pending restart": restarts not yet acknowledged.
CREATE INDEX workspace_actions_pending_restart_idx ON workspace_actions (workspace_id)
    WHERE acked_at IS NULL AND type = 'restart';

-- 6. "Has a refusal": the few workspaces a refused request was recorded for, in id order.
--    Refusals are written by their own flush, never by a heartbeat: beats stay HOT.
CREATE INDEX workspaces_refused_idx ON workspaces (id) WHERE refused_at IS NOT NULL;
