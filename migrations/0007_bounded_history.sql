-- Bounded history (issue 15): retention prunes events, finished runs, acknowledged actions
-- and tombstones in small batches, each found through an index, and removed workspaces
-- leave the hot paths.
--
-- 1. Live workspaces apart from tombstones. Status is in both predicates, so a status change
--    maintains these indexes (it is not a HOT update); heartbeats never touch status and stay
--    HOT. The sweeper, /fleet, /metrics and the default list read live rows through
--    workspaces_live_idx only; a status filter reads workspaces_status_idx, whatever the plan.
CREATE INDEX workspaces_live_idx ON workspaces (id) WHERE status <> 'removed';
CREATE INDEX workspaces_status_idx ON workspaces (status, id);
-- Tombstones, oldest removal first, for the pruner.
CREATE INDEX workspaces_removed_idx ON workspaces (status_changed_at) WHERE status = 'removed';

-- 2. Finished runs in finishing order, and acknowledged actions in acknowledging order.
CREATE INDEX reconciles_finished_idx ON reconciles (finished_at, id)
    WHERE status IN ('succeeded', 'failed');
CREATE INDEX workspace_actions_acked_idx ON workspace_actions (acked_at)
    WHERE acked_at IS NOT NULL;

-- 3. The highest event sequence number pruning ever deleted: a stream client resuming at or
--    below it may have missed events and is told so instead of silently skipping them.
CREATE TABLE retention_state (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    events_pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO retention_state DEFAULT VALUES;
