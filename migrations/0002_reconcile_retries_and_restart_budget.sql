-- A run that installed plugins but was refused a restart by the per-workspace restart budget
-- says so, so that plugins_sync and `why` can explain it.
ALTER TABLE reconciles ADD COLUMN restart_withheld boolean NOT NULL DEFAULT false;

-- The restart budget counts recent restart requests per workspace.
CREATE INDEX workspace_actions_recent_idx ON workspace_actions (workspace_id, created_at);
