-- 1. The legal status transitions, enforced by the database for every writer. The table
--    must equal registry/statuses.py's LEGAL_TRANSITIONS (a test checks it); the trigger
--    refuses anything else, so an illegal change can never be half-written.
CREATE TABLE status_transitions (
    from_status text NOT NULL,
    to_status   text NOT NULL,
    PRIMARY KEY (from_status, to_status)
);

INSERT INTO status_transitions (from_status, to_status) VALUES
    ('provisioning', 'online'), ('provisioning', 'degraded'), ('provisioning', 'failed'),
    ('online', 'degraded'), ('online', 'offline'),
    ('degraded', 'online'), ('degraded', 'offline'),
    ('offline', 'online'), ('offline', 'degraded'),
    ('failed', 'online'), ('failed', 'degraded'),
    ('provisioning', 'paused'), ('online', 'paused'), ('degraded', 'paused'),
    ('offline', 'paused'), ('failed', 'paused'),
    ('paused', 'offline'),
    ('provisioning', 'removed'), ('online', 'removed'), ('degraded', 'removed'),
    ('offline', 'removed'), ('failed', 'removed'), ('paused', 'removed');

CREATE FUNCTION refuse_illegal_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM status_transitions
                   WHERE from_status = OLD.status AND to_status = NEW.status) THEN
        RAISE EXCEPTION 'illegal status transition % -> % for workspace %',
            OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

-- WHEN keeps the heartbeat path free of the trigger unless the status really changes.
CREATE TRIGGER workspaces_status_transition
    BEFORE UPDATE OF status ON workspaces
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION refuse_illegal_status_change();

-- 2. The event stream. `id` is assigned at insert and is NOT in commit order; `seq` is
--    assigned afterwards by one sequencer at a time, to committed events only, so readers
--    that resume "after seq N" never miss an event that committed late. Fleet-level events
--    (the mass-expiry guard) have no workspace.
ALTER TABLE workspace_events ADD COLUMN seq bigint UNIQUE;
ALTER TABLE workspace_events ALTER COLUMN workspace_id DROP NOT NULL;
ALTER TABLE workspace_events DROP CONSTRAINT workspace_events_kind_check;
ALTER TABLE workspace_events ADD CONSTRAINT workspace_events_kind_check
    CHECK (kind IN ('status', 'reconcile', 'fleet'));
CREATE INDEX workspace_events_unsequenced_idx ON workspace_events (id) WHERE seq IS NULL;
CREATE INDEX workspace_events_workspace_seq_idx ON workspace_events (workspace_id, seq);
DROP INDEX workspace_events_workspace_idx;

-- 3. The liveness sweeper's mass-expiry guard, shared by every registry process.
CREATE TABLE fleet_guard (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holding    boolean NOT NULL DEFAULT false,
    since      timestamptz,
    live       integer NOT NULL DEFAULT 0,
    stale      integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO fleet_guard DEFAULT VALUES;
