-- Status writes at fleet scale (a sweep expiring 100k workspaces, a fleet coming online):
--
-- 1. The index on status made every status change a non-HOT update with index maintenance.
--    Nothing needs it: lists page through the primary key filtering on status, and sweeps
--    and counts scan the table anyway (no index on last_heartbeat_at, by design).
DROP INDEX workspaces_status_idx;

-- 2. The legal-transition check ran a PL/pgSQL lookup for every changed row. The trigger's
--    WHEN clause now holds the legal pairs, built from status_transitions: the executor
--    tests it in C, and the function runs only to refuse an illegal change.
DROP TRIGGER workspaces_status_transition ON workspaces;

CREATE OR REPLACE FUNCTION refuse_illegal_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'illegal status transition % -> % for workspace %',
        OLD.status, NEW.status, OLD.id
        USING ERRCODE = 'check_violation';
END;
$$;

DO $$
DECLARE
    legal text[];
BEGIN
    SELECT array_agg(from_status || '>' || to_status ORDER BY from_status, to_status)
    INTO legal FROM status_transitions;
    EXECUTE format(
        'CREATE TRIGGER workspaces_status_transition
             BEFORE UPDATE OF status ON workspaces
             FOR EACH ROW
             WHEN (OLD.status IS DISTINCT FROM NEW.status
                   AND (OLD.status || %L || NEW.status) <> ALL (%L::text[]))
             EXECUTE FUNCTION refuse_illegal_status_change()',
        '>', legal);
END;
$$;

-- 3. The event log is append-only history of workspaces that are never deleted (removal is a
--    tombstone status), and every status change writes one event: its foreign key check cost
--    a third of a 100k-workspace sweep (432 ms of 2.5 s, EXPLAIN ANALYZE). History keeps the
--    id; the workspace row it names is not enforced.
ALTER TABLE workspace_events DROP CONSTRAINT workspace_events_workspace_id_fkey;
