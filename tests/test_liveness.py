"""The liveness sweeper: prompt expiry, provisioning timeouts, the mass-expiry guard."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from registry.db.pool import init_connection
from registry.liveness import SweepPolicy, sweep
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, Workspace

FAST = {"offline_after_s": 0.6, "sweep_interval_s": 0.1, "provision_timeout_s": 0.6}


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def status_of(registry: Registry, workspace: Workspace) -> str:
    status: str = await registry.db.fetchval(
        "SELECT status FROM workspaces WHERE id = $1", uuid.UUID(workspace.id)
    )
    return status


async def make_silent(registry: Registry, workspaces: list[Workspace], seconds: float) -> None:
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - make_interval(secs => $2) "
        "WHERE id = ANY($1::uuid[])",
        [uuid.UUID(w.id) for w in workspaces],
        seconds,
    )


async def test_silent_workspace_goes_offline_at_its_deadline_and_not_before(
    make_registry: MakeRegistry,
) -> None:
    # Time moves in the database (the sweeper's clock), not by sleeping: the background
    # sweeper waits out its grace window and an hour between sweeps, so only these run.
    registry = await make_registry(offline_after_s=5.0, sweep_interval_s=3600.0)
    policy = SweepPolicy.from_settings(registry.settings)
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)

    await make_silent(registry, [workspace], 4.5)
    await sweep(registry.db, policy)
    before_deadline = await status_of(registry, workspace)
    await make_silent(registry, [workspace], 5.5)
    await sweep(registry.db, policy)

    assert before_deadline == "online"
    assert await status_of(registry, workspace) == "offline"
    row = await registry.db.fetchrow(
        "SELECT from_status, cause, actor FROM workspace_events "
        "WHERE workspace_id = $1 AND to_status = 'offline'",
        uuid.UUID(workspace.id),
    )
    assert row is not None
    assert (row["from_status"], row["cause"], row["actor"]) == (
        "online",
        "heartbeat_timeout",
        "sweeper",
    )
    assert "offline after 5 s of silence" in (await registry.show(workspace))["why"]


async def test_the_background_sweeper_expires_a_silent_workspace(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(**FAST)
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await make_silent(registry, [workspace], 3600)

    # The loop itself runs: past its grace window, one of its sweeps takes it offline.
    await eventually(lambda: _is(registry, workspace, "offline"))


async def _is(registry: Registry, workspace: Workspace, status: str) -> bool:
    return await status_of(registry, workspace) == status


async def test_workspace_that_keeps_beating_stays_online(make_registry: MakeRegistry) -> None:
    registry = await make_registry(**FAST)
    workspace = await registry.create_workspace()

    for _ in range(15):
        await registry.heartbeat(workspace)
        await asyncio.sleep(0.1)

    assert await status_of(registry, workspace) == "online"


async def test_provisioning_workspace_that_never_calls_in_goes_failed(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(**FAST)
    workspace = await registry.create_workspace()

    await eventually(lambda: _is(registry, workspace, "failed"))
    beat = await registry.heartbeat(workspace)

    assert (beat["previous_status"], beat["status"]) == ("failed", "online")
    assert len(await registry.reconciles(workspace)) == 1


async def test_paused_and_removed_workspaces_are_never_swept(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(**FAST)
    paused, removed = await registry.create_workspace(), await registry.create_workspace()
    await registry.set_status(paused, "paused")
    await registry.set_status(removed, "removed")
    await make_silent(registry, [paused, removed], 3600)

    await asyncio.sleep(1.2)

    assert await status_of(registry, paused) == "paused"
    assert await status_of(registry, removed) == "removed"


async def test_fleet_going_silent_at_once_trips_the_guard_and_is_not_all_expired(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(**FAST, mass_expiry_rate=0.05)
    fleet = [await registry.create_workspace() for _ in range(20)]
    for workspace in fleet:
        await registry.heartbeat(workspace)
        # Fresh for an hour, however slowly this loop runs: with a 0.6 s window, a workspace
        # beaten early would otherwise expire on its own before the fleet goes silent, the
        # live fleet would shrink below the guard's minimum and the guard would not hold.
        await make_silent(registry, [workspace], -3600)
    await asyncio.sleep(0.7)  # past the start-up grace window
    await make_silent(registry, fleet, 3600)  # the whole fleet silent in one instant

    await eventually(lambda: _guard_holding(registry))
    # The silent count has just changed: for one window the guard takes nobody offline (a
    # fleet calling back in would be), then one per sweep.
    await eventually(lambda: _any_offline(registry, fleet))
    await asyncio.sleep(0.3)  # about three sweeps at one expiry each
    offline = [w for w in fleet if await status_of(registry, w) == "offline"]

    assert 1 <= len(offline) <= 10
    response = await registry.client.get("/fleet", headers=ADMIN)
    guard = (await response.json())["mass_expiry_guard"]
    assert guard["holding"] is True
    assert guard["live"] >= 10
    events = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE cause = 'mass_expiry_guard_holding'"
    )
    assert events == 1

    # Heartbeats return: the guard lets go.
    for workspace in fleet:
        await registry.heartbeat(workspace)
    await eventually(lambda: _guard_released(registry))


# A gradual outage, with time controlled through the database: the heartbeats of a fleet of 50
# stop one after another over 20 s; every 4 s a sweep runs (10 more silent each time, a fifth
# of the fleet). Judging one sweep at a time, the guard saw 6 of 50, 10 of 44 and 10 of 34
# silent (each within its 30%) and held only at the fourth sweep, with 26 of 50 offline.
# Counting the window's expirations, it holds at the second, with 6 offline.
GRADUAL = SweepPolicy(
    offline_after_s=10.0,
    provision_timeout_s=1e9,
    mass_expiry_share=0.3,
    mass_expiry_min_fleet=10,
    mass_expiry_rate=0.01,  # while holding: max(1, 1% of 50) = 1 per sweep
)
FLEET, OUTAGE_S, SWEEP_EVERY_S = 50, 20.0, 4.0


async def _online_fleet(db: asyncpg.Connection, n: int) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = [
        await db.fetchval(
            "INSERT INTO workspaces (name, token_hash) "
            "VALUES ('w-' || gen_random_uuid(), $1) RETURNING id",
            f"token-{i}".encode(),
        )
        for i in range(n)
    ]
    await db.execute(
        "UPDATE workspaces SET status = 'online', last_heartbeat_at = now() "
        "WHERE id = ANY($1::uuid[])",
        ids,
    )
    return ids


async def _at_moment(db: asyncpg.Connection, ids: list[uuid.UUID], moment_s: float) -> None:
    """Make the database look as it does `moment_s` into the outage: workspace i stopped
    beating at i * OUTAGE_S / FLEET seconds, and what the sweeper recorded is that much older."""
    stopped = [i * OUTAGE_S / len(ids) for i in range(len(ids))]
    await db.execute(
        "UPDATE workspaces w SET last_heartbeat_at = now() - make_interval(secs => s.silent) "
        "FROM unnest($1::uuid[], $2::float8[]) AS s(id, silent) WHERE w.id = s.id",
        ids,
        [max(0.0, moment_s - t) for t in stopped],
    )


async def test_heartbeats_stopping_gradually_trip_the_guard_before_the_share_is_expired(
    db: asyncpg.Connection,
) -> None:
    await init_connection(db)  # the codecs the registry's own connections have
    ids = await _online_fleet(db, FLEET)
    offline_when_holding = None
    moment = 0.2  # off the 0.4 s grid of stopping times, so no beat is exactly on a deadline
    while moment < OUTAGE_S + 3 * GRADUAL.offline_after_s:
        await _at_moment(db, ids, moment)
        result = await sweep(db, GRADUAL)
        offline = await db.fetchval("SELECT count(*) FROM workspaces WHERE status = 'offline'")
        if result.holding and offline_when_holding is None:
            offline_when_holding = offline
        # The sweeper's record of its expirations ages with the simulated clock.
        await db.execute(
            "UPDATE fleet_expirations SET at = at - make_interval(secs => $1)", SWEEP_EVERY_S
        )
        moment += SWEEP_EVERY_S

    assert offline_when_holding is not None, "the guard never held"
    # It held before more than the share (30% of 50) was offline, and went on holding.
    assert offline_when_holding <= GRADUAL.mass_expiry_share * FLEET + 1
    assert result.holding
    guard = await db.fetchrow("SELECT holding, live, stale, expired FROM fleet_guard")
    assert guard is not None
    assert guard["holding"] is True
    assert guard["live"] + offline == FLEET
    assert guard["stale"] == guard["live"]  # the whole remaining fleet is silent


async def _any_offline(registry: Registry, fleet: list[Workspace]) -> bool:
    return any([await status_of(registry, w) == "offline" for w in fleet])


async def _guard_holding(registry: Registry) -> bool:
    return bool(await registry.db.fetchval("SELECT holding FROM fleet_guard"))


async def _guard_released(registry: Registry) -> bool:
    return not await _guard_holding(registry)


async def test_after_start_every_workspace_gets_one_liveness_window(
    make_registry: MakeRegistry, dsn: str
) -> None:
    # The fleet went silent while no registry ran (its runtimes could not reach it).
    first = await make_registry()
    workspace = await first.create_workspace()
    await first.heartbeat(workspace)
    await make_silent(first, [workspace], 3600)

    registry = await make_registry(offline_after_s=1.0, sweep_interval_s=0.1)
    started = time.monotonic()
    await asyncio.sleep(0.6)
    still_online = await status_of(registry, workspace)
    await eventually(lambda: _is(registry, workspace, "offline"))

    assert still_online == "online"
    assert time.monotonic() - started >= 1.0


async def test_guard_figures_are_fresh_from_the_first_sweep_after_start(
    make_registry: MakeRegistry,
) -> None:
    first = await make_registry()
    fleet = [await first.create_workspace() for _ in range(3)]
    for workspace in fleet:
        await first.heartbeat(workspace)
    await make_silent(first, fleet[:1], 3600)
    # Stopped, so only the new process's sweeps write figures: on a loaded machine the first
    # one's sweeper (in its own start-up grace, counting nobody silent) could write after the
    # reset below and be taken for the new one's.
    await first.client.close()
    # Figures no sweep could have written (an old updated_at would read as an outage).
    await first.db.execute("UPDATE fleet_guard SET live = 0, stale = 0")

    # A start with a liveness window of a minute: its sweeper judges nobody for that minute,
    # but counts from its first sweep.
    registry = await make_registry(offline_after_s=60.0, sweep_interval_s=0.1)
    await eventually(lambda: _guard_written(registry))
    response = await registry.client.get("/fleet", headers=ADMIN)
    guard = (await response.json())["mass_expiry_guard"]

    assert (guard["holding"], guard["live"], guard["silent"], guard["expired"]) == (
        False,
        3,
        1,
        0,
    )
    assert await status_of(registry, fleet[0]) == "online"  # the grace window: not expired


async def _guard_written(registry: Registry) -> bool:
    return bool(await registry.db.fetchval("SELECT live > 0 FROM fleet_guard"))


async def test_two_sweepers_expire_each_workspace_once(make_registry: MakeRegistry) -> None:
    settings = {**FAST, "mass_expiry_min_fleet": 1000}
    one = await make_registry(**settings)
    await make_registry(**settings)
    fleet = [await one.create_workspace() for _ in range(30)]
    for workspace in fleet:
        await one.heartbeat(workspace)
    await asyncio.sleep(0.7)
    await make_silent(one, fleet, 3600)

    await eventually(lambda: _all_offline(one, fleet))

    rows = await one.db.fetch(
        "SELECT workspace_id, count(*) AS n FROM workspace_events "
        "WHERE to_status = 'offline' GROUP BY workspace_id"
    )
    assert sorted(r["n"] for r in rows) == [1] * 30


async def _all_offline(registry: Registry, fleet: list[Workspace]) -> bool:
    count = await registry.db.fetchval(
        "SELECT count(*) FROM workspaces WHERE status = 'offline' AND id = ANY($1::uuid[])",
        [uuid.UUID(w.id) for w in fleet],
    )
    return bool(count == len(fleet))


async def test_next_heartbeat_interval_comes_from_configuration_with_jitter(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(heartbeat_interval_s=10.0)
    workspace = await registry.create_workspace()

    intervals = [(await registry.heartbeat(workspace))["next_heartbeat_s"] for _ in range(20)]

    assert all(9.0 <= s <= 11.0 for s in intervals)
    assert len(set(intervals)) > 1
