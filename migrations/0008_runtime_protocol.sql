-- A tolerant, observable runtime protocol (issue 10).
--
-- 1. Token rotation with a grace period: the previous token keeps working until
--    previous_token_valid_until, and when the runtime last used it is recorded so an
--    operator sees a runtime that never picked up its new token. After the grace period it
--    is still recognised, to answer 401 `token_rotated` instead of a bare "unknown token".
ALTER TABLE workspaces
    ADD COLUMN token_rotated_at           timestamptz,
    ADD COLUMN previous_token_hash        bytea,
    ADD COLUMN previous_token_valid_until timestamptz,
    ADD COLUMN previous_token_used_at     timestamptz;
CREATE UNIQUE INDEX workspaces_previous_token_idx ON workspaces (previous_token_hash)
    WHERE previous_token_hash IS NOT NULL;

-- 2. The last refusal of the workspace's runtime requests (400/401/403/410): written at
--    most once per workspace per flush interval, never by an accepted heartbeat, so it costs
--    the hot path nothing. refused_since/refused_count cover the refusals since the first
--    one after the last accepted beat. Not indexed: these updates stay HOT.
ALTER TABLE workspaces
    ADD COLUMN refused_at     timestamptz,
    ADD COLUMN refused_since  timestamptz,
    ADD COLUMN refused_count  integer NOT NULL DEFAULT 0,
    ADD COLUMN refused_status smallint,
    ADD COLUMN refused_code   text,
    ADD COLUMN refused_field  text;

-- 3. The runtime's own heartbeat interval as observed (smoothed, capped by the writer):
--    liveness waits for a few of its intervals, so a runtime on a fixed 30 s interval does
--    not flap against a registry configured for 5 s. Written by heartbeats, not indexed.
ALTER TABLE workspaces ADD COLUMN heartbeat_interval_s double precision;

-- 4. New event kinds: `runtime` (the box restarted on its own: its uptime went down) and
--    `token` (an operator rotated the workspace token).
ALTER TABLE workspace_events DROP CONSTRAINT workspace_events_kind_check;
ALTER TABLE workspace_events ADD CONSTRAINT workspace_events_kind_check
    CHECK (kind IN ('status', 'reconcile', 'fleet', 'runtime', 'token'));

-- 5. The content digest of what was delivered (registry.plugins.fetch.tree_digest), beside
--    the version sha: for a git source the sha is a commit, which a runtime cannot see in the
--    delivered files; it may report either, and either counts as installed.
ALTER TABLE installed_plugins ADD COLUMN digest text;

-- 6. A runtime that restarted while online (its uptime went down, or it registered again)
--    may be a new box without its plugins: it gets a reconcile of its own trigger.
ALTER TABLE reconciles DROP CONSTRAINT reconciles_trigger_check;
ALTER TABLE reconciles ADD CONSTRAINT reconciles_trigger_check CHECK (trigger IN
    ('online_transition', 'manual', 'plugin_updated', 'declared_changed', 'retry',
     'runtime_restarted'));
