"""Workspaces by status and by `plugins_sync`, fleet-wide, in one aggregate statement (for
/metrics).

The same rule as registry/verdicts.py's `_sync`, written as SQL so a 100k fleet is counted by
the database instead of being loaded and judged one by one; tests/test_metrics.py checks both
say the same of one fleet. One difference, on purpose: a source the allowlist refuses now is
a check of the Python side (it may resolve paths on disk), so such a workspace is counted by
the rest of its state here while its view says `out_of_sync`. And a report naming one plugin
twice counts here as reported if either entry matches; the view reads the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.db import Connection
from registry.statuses import Status, Sync

# Set-based, so a 100k fleet costs a few hash joins rather than a dozen index probes per
# workspace (measured in docs/benchmarks.md): each live workspace's last run (one index probe
# each), the workspaces whose plan is not all skips (a declared plugin not
# installed, or from another source, or, when the runtime reports its plugins, not reported
# with the recorded sha or digest; an installed one no longer declared), and those with a
# restart still to be acknowledged. Tombstones are not read: their number is kept as they come
# and go (migrations/0015_tombstone_count.sql).
FLEET_COUNTS = """
WITH live AS (
    SELECT id, status, observed_plugins FROM workspaces WHERE status <> 'removed'
),
-- A declared plugin not installed or from another source, or installed and no longer declared.
mismatched AS (
    SELECT COALESCE(d.workspace_id, i.workspace_id) AS workspace_id
    FROM declared_plugins d
    FULL JOIN installed_plugins i ON i.workspace_id = d.workspace_id AND i.name = d.name
    WHERE i.name IS NULL OR d.name IS NULL OR i.source <> d.source
),
-- What runtimes report, one row per plugin (expanded once, joined by hash below).
reported AS (
    SELECT w.id AS workspace_id, o->>'name' AS name, o->>'sha' AS sha
    FROM live w CROSS JOIN LATERAL jsonb_array_elements(w.observed_plugins) o
    WHERE jsonb_typeof(w.observed_plugins) = 'array'
),
-- Installed, and the runtime reports its plugins, but not this one with its sha or digest.
-- (One no longer declared is mismatched anyway: checking it too changes no verdict.)
unreported AS (
    SELECT i.workspace_id
    FROM installed_plugins i JOIN live w ON w.id = i.workspace_id
    WHERE w.observed_plugins IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM reported r
                      WHERE r.workspace_id = i.workspace_id AND r.name = i.name
                        AND r.sha IN (i.sha, i.digest))
),
unconverged AS (
    SELECT workspace_id FROM mismatched UNION SELECT workspace_id FROM unreported
),
restarting AS (
    SELECT DISTINCT workspace_id FROM workspace_actions
    WHERE type = 'restart' AND acked_at IS NULL
)
SELECT w.status, CASE
        WHEN l.status IN ('queued', 'running') THEN 'reconciling'
        WHEN u.workspace_id IS NOT NULL
        THEN CASE WHEN l.status = 'failed' THEN 'failed' ELSE 'out_of_sync' END
        WHEN l.status = 'failed' THEN 'failed'
        WHEN COALESCE(l.restart_withheld, false) OR x.workspace_id IS NOT NULL
        THEN 'out_of_sync'
        ELSE 'synced'
    END AS sync,
    count(*)::int AS n
FROM live w
-- Each live workspace's last run, one probe of reconciles_workspace_idx each: the history of
-- runs (millions of rows) and of tombstones is never sorted.
LEFT JOIN LATERAL (
    SELECT r.status, r.restart_withheld FROM reconciles r
    WHERE r.workspace_id = w.id
    ORDER BY r.created_at DESC, r.id DESC
    LIMIT 1
) l ON true
LEFT JOIN unconverged u ON u.workspace_id = w.id
LEFT JOIN restarting x ON x.workspace_id = w.id
GROUP BY 1, 2
UNION ALL
SELECT 'removed', NULL, n::int FROM tombstone_count
"""


@dataclass(frozen=True, slots=True)
class FleetCounts:
    by_status: dict[str, int]  # every status, zero included
    by_sync: dict[str, int]  # non-removed workspaces; every plugins_sync, zero included


async def fleet_counts(conn: Connection) -> FleetCounts:
    by_status = {s.value: 0 for s in Status}
    by_sync = {s.value: 0 for s in Sync}
    for row in await conn.fetch(FLEET_COUNTS):
        by_status[row["status"]] += row["n"]
        if row["sync"] is not None:
            by_sync[row["sync"]] += row["n"]
    return FleetCounts(by_status, by_sync)
