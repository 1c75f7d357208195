"""History stays bounded under churn (issue 15): workspaces flap, reconcile, change plugins,
restart, and come and go, round after round; each round the history ages past retention and
the pruner runs. Every history table stops growing once retention is reached.

Time is controlled, never waited for: between rounds every timestamp the pruner reads is moved
back past the retention age, as if a day went by.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from registry.retention import RetentionPolicy, prune
from tests.support import ADMIN, Registry, Workspace, write_tree

DAY = 86400.0
WORKSPACES = 4
ROUNDS = 6
EVENT_KEEP = 5
RUN_KEEP = 2
HISTORY = ("workspace_events", "reconciles", "reconcile_steps", "workspace_actions", "workspaces")

POLICY = RetentionPolicy(
    event_retention_s=DAY,
    event_keep=EVENT_KEEP,
    reconcile_retention_s=DAY,
    reconcile_keep=RUN_KEEP,
    action_retention_s=DAY,
    tombstone_retention_s=DAY,
    batch=7,  # small: every pass takes several batches
    pause_s=0.0,
)

# A day goes by for everything the pruner judges by age.
A_DAY_PASSES = """
UPDATE workspace_events SET at = at - interval '2 days';
UPDATE reconciles SET created_at = created_at - interval '2 days',
                      finished_at = finished_at - interval '2 days';
UPDATE workspace_actions SET acked_at = acked_at - interval '2 days' WHERE acked_at IS NOT NULL;
UPDATE workspaces SET status_changed_at = status_changed_at - interval '2 days'
WHERE status = 'removed';
"""


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {table: int(await db.fetchval(f"SELECT count(*) FROM {table}")) for table in HISTORY}


async def beat_and_ack(registry: Registry, workspace: Workspace, uptime: int) -> None:
    """Heartbeat; acknowledge whatever restart is asked, as a runtime that restarts does."""
    answer = await registry.heartbeat(workspace, uptime_seconds=uptime)
    acks = [action["id"] for action in answer["actions"]]
    if acks:
        await registry.heartbeat(workspace, acks=acks, uptime_seconds=1)


async def churn_round(
    registry: Registry, fleet: list[Workspace], plugins: list[dict[str, str]], round_no: int
) -> None:
    """One day of churn: each workspace goes offline and comes back (a reconcile each time),
    its plugin set changes (install or remove, then a restart), and one workspace is
    replaced by a new one (a tombstone)."""
    for workspace in fleet:
        await registry.set_status(workspace, "offline")
        await beat_and_ack(registry, workspace, uptime=100)
        declared = plugins if round_no % 2 else plugins[:1]
        response = await registry.client.put(
            f"/workspaces/{workspace.id}/plugins", json={"plugins": declared}, headers=ADMIN
        )
        assert response.status == 200, await response.text()
        await registry.settled(workspace)
        await beat_and_ack(registry, workspace, uptime=200)
    gone = fleet.pop(0)
    assert (await registry.client.delete(f"/workspaces/{gone.id}", headers=ADMIN)).status == 204
    newcomer = await registry.create_workspace(plugins=plugins[:1])
    await beat_and_ack(registry, newcomer, uptime=5)
    await registry.settled(newcomer)
    fleet.append(newcomer)


async def test_every_history_table_stops_growing_once_retention_is_reached(
    registry: Registry, plugin_sources: Path
) -> None:
    plugins = [
        {"source": f"file://{write_tree(plugin_sources / name, {'main.py': name})}"}
        for name in ("alpha", "beta")
    ]
    fleet = [await registry.create_workspace(plugins=plugins[:1]) for _ in range(WORKSPACES)]
    for workspace in fleet:
        await beat_and_ack(registry, workspace, uptime=5)
        await registry.settled(workspace)

    after_each_round: list[dict[str, int]] = []
    written: dict[str, int] = dict.fromkeys(HISTORY, 0)
    for round_no in range(ROUNDS):
        before = await counts(registry.db)
        await churn_round(registry, fleet, plugins, round_no)
        for table, n in (await counts(registry.db)).items():
            written[table] += max(0, n - before[table])
        await registry.db.execute(A_DAY_PASSES)
        result = await prune(registry.db, POLICY)
        assert result.ran
        after_each_round.append(await counts(registry.db))

    # The churn really wrote history, far more than is kept.
    assert written["workspace_events"] > 3 * EVENT_KEEP * WORKSPACES
    assert written["reconciles"] > 3 * RUN_KEEP * WORKSPACES
    assert written["workspace_actions"] >= ROUNDS * WORKSPACES
    # What stays is bounded by what retention keeps per live workspace, whatever the rounds.
    for kept in after_each_round:
        assert kept["workspace_events"] <= EVENT_KEEP * WORKSPACES + 2, kept  # + fleet events
        assert kept["reconciles"] <= RUN_KEEP * WORKSPACES, kept
        assert kept["workspace_actions"] <= WORKSPACES, kept  # at most one still asked each
        assert kept["workspaces"] == WORKSPACES, kept  # every tombstone went
        assert kept["reconcile_steps"] <= len(plugins) * kept["reconciles"], kept
    # And it has stopped growing: the last round keeps no more than the early rounds did.
    for table in HISTORY:
        early = max(after_each_round[1][table], after_each_round[2][table])
        assert after_each_round[-1][table] <= early, (table, after_each_round)
    acknowledged = "SELECT count(*) FROM workspace_actions WHERE acked_at IS NOT NULL"
    assert await registry.db.fetchval(acknowledged) == 0
    live = {uuid.UUID(w.id) for w in fleet}
    assert {
        row["workspace_id"]
        for row in await registry.db.fetch("SELECT workspace_id FROM reconciles")
    } <= live
