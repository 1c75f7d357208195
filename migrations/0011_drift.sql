-- Boxes replaced while online get their plugins back (issue 13, item 6).
--
-- 1. When the runtime's report of its plugins last changed: a report that differs from what
--    the registry recorded is drift only once it has stood still for a settle time (a box
--    that just booted reports its plugins a moment later). Written by the heartbeat in the
--    statement it already runs, not indexed, so heartbeat updates stay HOT.
ALTER TABLE workspaces ADD COLUMN observed_plugins_at timestamptz;
UPDATE workspaces SET observed_plugins_at = last_heartbeat_at WHERE observed_plugins IS NOT NULL;

-- 2. The box's own identity, if its runtime sends one at register (a container or instance
--    id): a register with another one is a new box, whatever its uptime says.
ALTER TABLE workspaces ADD COLUMN instance_id text;

-- 3. The reconcile the drift check queues: recorded plugins the runtime does not report.
ALTER TABLE reconciles DROP CONSTRAINT reconciles_trigger_check;
ALTER TABLE reconciles ADD CONSTRAINT reconciles_trigger_check CHECK (trigger IN
    ('online_transition', 'manual', 'plugin_updated', 'declared_changed', 'retry',
     'runtime_restarted', 'drift_detected'));
