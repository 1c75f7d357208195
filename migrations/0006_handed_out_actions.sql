-- A restart action that a heartbeat answer already handed out may have been carried out
-- already: a later install must ask a new restart instead of folding into it, or the new
-- plugin is on disk but never loaded. The heartbeat stamps when it first handed one out.
ALTER TABLE workspace_actions ADD COLUMN delivered_at timestamptz;
