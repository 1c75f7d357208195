-- Workspaces, their declared/installed plugins, status events, durable reconciles and
-- runtime actions. Status values and legal transitions are owned by registry/statuses.py;
-- the CHECK constraints only keep garbage out.

CREATE TABLE workspaces (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name              text NOT NULL,
    status            text NOT NULL DEFAULT 'provisioning' CHECK (status IN
                        ('provisioning', 'online', 'degraded', 'offline', 'failed', 'paused', 'removed')),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- sha256 of the workspace token; the token itself is never stored.
    token_hash        bytea NOT NULL UNIQUE,
    delivery          text NOT NULL DEFAULT 'filesystem' CHECK (delivery IN ('filesystem', 'http')),
    url               text,
    agent_card        jsonb,
    -- Heartbeat fields: written on every beat, deliberately not indexed so updates stay HOT.
    last_heartbeat_at timestamptz,
    error_rate        double precision,
    sample_error      text,
    active_tasks      integer,
    uptime_seconds    double precision,
    current_task      text,
    monthly_spend     double precision,
    runtime_state     text,
    -- What the runtime reported as installed in its last heartbeat; NULL when it did not say.
    observed_plugins  jsonb
);

CREATE INDEX workspaces_status_idx ON workspaces (status, id);

CREATE TABLE declared_plugins (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL,
    source       text NOT NULL,
    position     integer NOT NULL,
    PRIMARY KEY (workspace_id, name)
);

CREATE INDEX declared_plugins_source_idx ON declared_plugins (source);

-- What the registry delivered; a row is written only after delivery succeeded.
CREATE TABLE installed_plugins (
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL,
    source       text NOT NULL,
    sha          text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, name)
);

CREATE TABLE workspace_events (
    id           bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('status', 'reconcile')),
    from_status  text,
    to_status    text,
    cause        text NOT NULL,
    actor        text NOT NULL DEFAULT 'registry',
    detail       jsonb,
    at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workspace_events_workspace_idx ON workspace_events (workspace_id, id);

-- A queued row is the durable intent to reconcile, committed with whatever caused it.
CREATE TABLE reconciles (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id      uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    trigger           text NOT NULL CHECK (trigger IN
                        ('online_transition', 'manual', 'plugin_updated', 'declared_changed', 'retry')),
    status            text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    refresh           boolean NOT NULL DEFAULT false,
    attempt           integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    error             text,
    restart_requested boolean NOT NULL DEFAULT false,
    -- Which process runs it and until when; an expired lease means that process died.
    lease_owner       text,
    lease_expires_at  timestamptz
);

-- Requests that arrive while a run is queued fold into it; one run per workspace at a time.
CREATE UNIQUE INDEX reconciles_one_queued_idx ON reconciles (workspace_id) WHERE status = 'queued';
CREATE UNIQUE INDEX reconciles_one_running_idx ON reconciles (workspace_id) WHERE status = 'running';
CREATE INDEX reconciles_due_idx ON reconciles (next_attempt_at) WHERE status IN ('queued', 'running');
CREATE INDEX reconciles_workspace_idx ON reconciles (workspace_id, created_at DESC);

CREATE TABLE reconcile_steps (
    id           bigserial PRIMARY KEY,
    reconcile_id uuid NOT NULL REFERENCES reconciles (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    plugin       text NOT NULL,
    action       text NOT NULL CHECK (action IN ('install', 'skip', 'upgrade', 'remove')),
    status       text NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped')),
    source       text,
    sha          text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    error        text
);

CREATE INDEX reconcile_steps_reconcile_idx ON reconcile_steps (reconcile_id, id);

-- Work asked of the runtime (a restart once plugins were installed), repeated until acked.
CREATE TABLE workspace_actions (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    type         text NOT NULL CHECK (type IN ('restart')),
    reason       text NOT NULL,
    reconcile_id uuid REFERENCES reconciles (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    acked_at     timestamptz
);

CREATE INDEX workspace_actions_pending_idx ON workspace_actions (workspace_id) WHERE acked_at IS NULL;
