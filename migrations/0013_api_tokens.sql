-- Named API tokens with a role (issue 14), beside the configured bootstrap admin token.
-- A token is `rat_<lookup>_<secret>`: `lookup` is a random, non-secret handle indexed here so
-- authentication is one index probe; only the SHA-256 of the whole token is kept, and it is
-- compared in constant time after the probe. A revoked token keeps its row (the audit trail
-- names it) but frees its name.
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('read', 'operate', 'admin')),
    lookup      text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz,
    revoked_by  text
);
CREATE UNIQUE INDEX api_tokens_live_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;

-- Operator actions that change no status (create's plugins, plugins set, rotate, reconcile,
-- fan-out, token create/revoke, guard ack) are `audit` events, actor = the token's name.
ALTER TABLE workspace_events DROP CONSTRAINT workspace_events_kind_check;
ALTER TABLE workspace_events ADD CONSTRAINT workspace_events_kind_check
    CHECK (kind IN ('status', 'reconcile', 'fleet', 'runtime', 'token', 'audit'));

-- An operator's acknowledgement of the mass-expiry guard: while the guard holds, a hold
-- acknowledged at or after its `since` no longer slows the sweeper. Cleared when it lets go.
ALTER TABLE fleet_guard ADD COLUMN acked_at timestamptz;
ALTER TABLE fleet_guard ADD COLUMN acked_by text;
