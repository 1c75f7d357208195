"""Growth: under steady churn, with retention, every history table stops growing.

Six rounds of what a fleet does (workspaces flapping offline and back, manual reconciles,
restarts asked for and acknowledged, workspaces deleted and replaced), each round aged by a
day afterwards and then pruned with a two-day retention. Once the retention age is reached
(round 3) the rows the workspaces own must stay at the level of the first rounds: the same
churn every round, about the same rows kept. Time is moved by rewriting timestamps, never
waited for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg

from registry.retention import prune
from tests.support import ADMIN, Registry, Workspace, write_tree
from tests.test_retention import DAY, policy

FLEET = 5
ROUNDS = 6
PLATEAU_FROM = 3  # retention keeps two days: by the third round it deletes as much as is made

# Every history table, counted as the rows that belong to a workspace, so fleet-wide events
# (their number depends on sweeps that ran meanwhile) are bounded apart.
COUNTS = {
    "workspace_events": "SELECT count(*) FROM workspace_events WHERE workspace_id IS NOT NULL",
    "reconciles": "SELECT count(*) FROM reconciles",
    "reconcile_steps": "SELECT count(*) FROM reconcile_steps",
    "workspace_actions": "SELECT count(*) FROM workspace_actions",
    "workspaces": "SELECT count(*) FROM all_workspaces",  # live ones and tombstones
}
FLEET_EVENTS = "SELECT count(*) FROM workspace_events WHERE workspace_id IS NULL"

# Everything a round left behind moves a day into the past.
AGE_BY_A_DAY = [
    "UPDATE workspace_events SET at = at - interval '1 day'",
    """UPDATE reconciles SET created_at = created_at - interval '1 day',
                             next_attempt_at = next_attempt_at - interval '1 day',
                             started_at = started_at - interval '1 day',
                             finished_at = finished_at - interval '1 day'""",
    """UPDATE workspace_actions SET created_at = created_at - interval '1 day',
                                    acked_at = acked_at - interval '1 day'""",
    "UPDATE removed_workspaces SET status_changed_at = status_changed_at - interval '1 day'",
]


async def runs_finished(db: asyncpg.Connection, within_s: float = 30.0) -> None:
    """Wait until no run is due or running (a run scheduled for later is not waited for)."""
    deadline = time.monotonic() + within_s
    busy = """SELECT count(*) FROM reconciles
              WHERE status = 'running' OR (status = 'queued' AND next_attempt_at <= now())"""
    while await db.fetchval(busy):
        assert time.monotonic() < deadline, await db.fetch(
            "SELECT * FROM reconciles WHERE status IN ('queued', 'running')"
        )
        await asyncio.sleep(0.05)


async def churn(registry: Registry, fleet: list[Workspace], plugin: Path) -> list[Workspace]:
    """One day of a small fleet's life; returns the fleet as it is afterwards."""
    declared = [{"source": f"file://{plugin}"}]
    for workspace in fleet:
        await registry.heartbeat(workspace)  # provisioning → online on the first round
        # A plugin change: a run with an install step, then a restart for the runtime.
        response = await registry.client.put(
            f"/workspaces/{workspace.id}/plugins", json={"plugins": declared}, headers=ADMIN
        )
        assert response.status == 200, await response.text()
    await runs_finished(registry.db)
    for workspace in fleet:
        actions = (await registry.heartbeat(workspace))["actions"]
        assert actions, "the plugin change asks for a restart"
        await registry.heartbeat(workspace, acks=[a["id"] for a in actions])
        await registry.set_status(workspace, "offline")  # a sweep took it offline
        await registry.heartbeat(workspace)  # back: offline → online, a reconcile
    await runs_finished(registry.db)
    # One workspace a day is replaced by a new one.
    gone, *kept = fleet
    response = await registry.client.delete(f"/workspaces/{gone.id}", headers=ADMIN)
    assert response.status in (200, 204), await response.text()
    return [*kept, await registry.create_workspace()]


async def test_every_history_table_stops_growing_under_churn(
    registry: Registry, plugin_sources: Path
) -> None:
    db = registry.db
    retention = policy(
        event_retention_s=2 * DAY,
        event_keep=3,
        reconcile_retention_s=2 * DAY,
        reconcile_keep=2,
        action_retention_s=2 * DAY,
        tombstone_retention_s=2 * DAY,
        batch=7,
    )
    plugins = [
        write_tree(plugin_sources / f"tool-{version}", {"main.py": f"print({version})\n"})
        for version in (1, 2)
    ]
    fleet = [await registry.create_workspace() for _ in range(FLEET)]
    kept: list[dict[str, int]] = []
    made = dict.fromkeys(COUNTS, 0)
    fleet_events: list[int] = []
    for number in range(ROUNDS):
        before = {table: int(await db.fetchval(sql)) for table, sql in COUNTS.items()}
        fleet = await churn(registry, fleet, plugins[number % 2])
        for table, sql in COUNTS.items():
            made[table] += int(await db.fetchval(sql)) - before[table]
        for statement in AGE_BY_A_DAY:
            await db.execute(statement)
        assert (await prune(db, retention)).ran
        kept.append({table: int(await db.fetchval(sql)) for table, sql in COUNTS.items()})
        fleet_events.append(int(await db.fetchval(FLEET_EVENTS)))

    # Once retention reached its age, no table goes above what the first rounds left, give or
    # take a row per workspace (whether a restart check folds into a flip's run or runs apart
    # depends on timing); growth would add a round's worth, tens of rows, every round.
    for table in COUNTS:
        first, later = kept[:PLATEAU_FROM], kept[PLATEAU_FROM:]
        bound = max(r[table] for r in first) + FLEET
        assert max(r[table] for r in later) <= bound, (table, kept)
    # Every table took new rows every round, and pruning took the old ones away: what is
    # kept at the end is a fraction of what was written.
    for table in COUNTS:
        assert kept[-1][table] < made[table] + (FLEET if table == "workspaces" else 0), (
            table,
            made,
            kept,
        )
    assert all(made[table] > 0 for table in COUNTS), made
    # Fleet-wide events are kept by age alone: never more than the first rounds left.
    assert max(fleet_events) <= max(fleet_events[:PLATEAU_FROM]) + 2, fleet_events
    live = {r["id"] for r in await db.fetch("SELECT id FROM workspaces WHERE status <> 'removed'")}
    assert live == {uuid.UUID(w.id) for w in fleet}
