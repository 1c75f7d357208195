"""The drift check's statement: live workspaces whose runtime keeps reporting its plugins
without some the registry recorded as installed get a reconcile (trigger `drift_detected`)."""

from __future__ import annotations

import uuid

from registry.db import Connection
from registry.statuses import LIVE_STATUSES

# A workspace drifted when all of these hold, each for a reason:
# - live, and its runtime reports its plugins (no report, no observation to compare);
# - the report has not changed for $2 s (a box that just booted reports them a moment later);
# - a record it does not report (sha nor digest), for a plugin still declared with that
#   source, recorded more than $2 s ago (one recorded just now is waiting for its restart);
# - no restart handed out or asked and not yet acknowledged (the box has not loaded what it
#   was given yet), and its last run did not withhold one (the plugins load at the next
#   restart: reinstalling them would change nothing);
# - no run queued or running, no drift run created in the last $3 s (one drift reconcile
#   per window, whatever keeps going wrong: a runtime that cannot load plugins at all), and no
#   run finished in the last $2 s (its outcome is still being reported).
# The first three are found set-based (hash joins over the plugin tables), the rest only for
# those few candidates: at 100k workspaces a check takes ~0.5 s of the database
# (docs/benchmarks.md), which is why it runs once per settle time, not per beat.
# Rows are taken FOR KEY SHARE before the run is inserted, the lock order of everything that
# queues a run (db/reconciles.py); rows a heartbeat holds right now are skipped, for the next
# check. The queued-run index folds two processes' checks into one run.
QUEUE_DRIFTED = """
WITH unreported AS (
    SELECT DISTINCT i.workspace_id
    FROM installed_plugins i
    JOIN declared_plugins d
      ON d.workspace_id = i.workspace_id AND d.name = i.name AND d.source = i.source
    JOIN workspaces w ON w.id = i.workspace_id
    -- The runtime's report (migration 0019): none, no observation to compare.
    JOIN reported_plugins r ON r.workspace_id = i.workspace_id
    WHERE w.status = ANY($1::text[])
      -- Plain column tests, so the planner can estimate them from the statistics and hash
      -- the plugin tables rather than probe them once per workspace.
      AND r.changed_at < now() - make_interval(secs => $2)
      AND i.installed_at < now() - make_interval(secs => $2)
      -- Reported with neither its sha nor its digest (containment: one entry with both keys).
      AND NOT r.plugins
              @> jsonb_build_array(jsonb_build_object('name', i.name, 'sha', i.sha))
      AND NOT COALESCE(r.plugins
              @> jsonb_build_array(jsonb_build_object('name', i.name, 'sha', i.digest)), false)
),
drifted AS (
    SELECT w.id FROM workspaces w JOIN unreported u ON u.workspace_id = w.id
    WHERE NOT EXISTS (SELECT 1 FROM workspace_actions a
                      WHERE a.workspace_id = w.id AND a.type = 'restart' AND a.acked_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM reconciles r
                      WHERE r.workspace_id = w.id
                        AND (r.status IN ('queued', 'running')
                             OR (r.trigger = 'drift_detected'
                                 AND r.created_at > now() - make_interval(secs => $3))
                             OR r.finished_at > now() - make_interval(secs => $2)))
      AND NOT COALESCE((SELECT r.restart_withheld FROM reconciles r
                        WHERE r.workspace_id = w.id
                        ORDER BY r.created_at DESC, r.id DESC LIMIT 1), false)
    ORDER BY w.id
    LIMIT $4
    FOR KEY SHARE OF w SKIP LOCKED
)
INSERT INTO reconciles (workspace_id, trigger, next_attempt_at)
SELECT id, 'drift_detected', now() FROM drifted
ON CONFLICT (workspace_id) WHERE status = 'queued' DO NOTHING
RETURNING workspace_id
"""


async def queue_drifted(
    conn: Connection, *, settle_s: float, every_s: float, limit: int
) -> list[uuid.UUID]:
    """Queue a drift reconcile for up to `limit` drifted workspaces; the ones queued."""
    rows = await conn.fetch(QUEUE_DRIFTED, LIVE_STATUSES, settle_s, every_s, limit)
    return [row["workspace_id"] for row in rows]
