"""Healthy workspaces survive an outage: the probes of issue 13, item 1, on a simulated clock.

A fleet of runtimes heartbeats through the real heartbeat statement, and the real sweeper
(LivenessSweeper.sweep_once, its start-up grace on the simulated clock) sweeps every second
with an offline window of 5 s, never stretched by observed intervals. For 20 s nothing gets
through: the database is down (the registry process stays up, its sweeps fail), or the
registry is (no sweeps at all; then a new process starts, or the frozen one resumes).
Runtimes retry every second, or back off between 1 s and 16 s as real ones do, and beat every
second again once they get through.

What must hold: no healthy workspace is taken offline, and so no beat finds its workspace
offline and queues a reconcile. Before the fix, the 1 s fleet lost 4 of 200 at the first sweep
after the database came back, and the backing-off one 27-31%: the guard held, released below
its share and expired the rest in one sweep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from registry.db.heartbeats import BeatPolicy, apply_beats
from registry.db.pool import init_connection
from registry.keys import INGEST
from registry.liveness import LivenessSweeper
from registry.metrics import Metrics
from registry.settings import Settings
from registry.statuses import Status
from tests.conftest import MakeRegistry
from tests.sim_clock import SimClock
from tests.support import ADMIN, Registry, beat

OFFLINE_AFTER_S = 5.0
SWEEP_EVERY_S = 1.0
STEP_S = 0.25
OUTAGE_AT_S, OUTAGE_S = 10.37, 20.0  # off the step grid: no beat lands on a deadline
MAX_BACKOFF_S = 16.0
# Past the outage: the slowest backoff, then the guard's settling window and one more.
END_S = OUTAGE_AT_S + OUTAGE_S + MAX_BACKOFF_S + 4 * OFFLINE_AFTER_S

Backoff = Callable[[int, random.Random], float]


def every_second(failures: int, rng: random.Random) -> float:
    return 1.0


def backing_off(failures: int, rng: random.Random) -> float:
    """Doubling from 1 s up to 16 s, jittered (full jitter above the 1 s floor)."""
    return rng.uniform(1.0, min(MAX_BACKOFF_S, 2.0**failures))


@dataclass
class Runtime:
    workspace_id: uuid.UUID
    token_hash: bytes
    next_at: float
    failures: int = 0


@dataclass
class Outcome:
    offline_events: int
    reconciles: int
    offline_now: int
    guard_held: bool


async def _fleet(db: asyncpg.Connection, n: int, rng: random.Random) -> list[Runtime]:
    hashes = [hashlib.sha256(f"outage-{i}".encode()).digest() for i in range(n)]
    ids: list[uuid.UUID] = [
        row["id"]
        for row in await db.fetch(
            "INSERT INTO workspaces (name, token_hash) SELECT 'w-' || encode(h, 'hex'), h "
            "FROM unnest($1::bytea[]) h "
            "RETURNING id, token_hash",
            hashes,
        )
    ]
    await db.execute(
        "UPDATE workspaces SET status = 'online', last_heartbeat_at = now() "
        "WHERE id = ANY($1::uuid[])",
        ids,
    )
    by_id = {
        r["id"]: r["token_hash"] for r in await db.fetch("SELECT id, token_hash FROM workspaces")
    }
    # Each runtime on its own phase within the second.
    return [Runtime(i, by_id[i], rng.uniform(0.0, 1.0)) for i in ids]


def _sweeper(
    settings: Settings, clock: SimClock, refused: Callable[[], int] = lambda: 0
) -> LivenessSweeper:
    # sweep_once is handed its connection: the pool is never used.
    pool: asyncpg.Pool = None  # type: ignore[assignment]
    return LivenessSweeper(pool, settings, Metrics(), clock=clock.monotonic, refused=refused)


async def run_outage(
    db: asyncpg.Connection,
    base: Settings,
    *,
    fleet_size: int,
    backoff: Backoff,
    outage: str,
    seed: int = 13,
) -> Outcome:
    """The scenario, start to end; what the sweeper did to the fleet."""
    await init_connection(db)
    settings = dataclasses.replace(
        base,
        offline_after_s=OFFLINE_AFTER_S,
        offline_after_max_s=OFFLINE_AFTER_S,  # the window never stretches: the strict case
        sweep_interval_s=SWEEP_EVERY_S,
        heartbeat_interval_s=1.0,
    )
    policy = BeatPolicy(max_interval_s=settings.offline_after_max_s)
    rng = random.Random(seed)
    runtimes = await _fleet(db, fleet_size, rng)
    clock = SimClock(db)
    sweeper = _sweeper(settings, clock)
    await clock.advance(OFFLINE_AFTER_S + 0.1)  # past the first process's start-up grace
    next_sweep = clock.now
    back_at = OUTAGE_AT_S + OUTAGE_S
    guard_held = restarted = False
    while clock.now < END_S:
        await clock.advance(STEP_S)
        now = clock.now
        down = OUTAGE_AT_S <= now < back_at
        due = [r for r in runtimes if r.next_at <= now]
        if down:
            for runtime in due:
                runtime.failures += 1
                runtime.next_at = now + backoff(runtime.failures, rng)
        elif due:
            results = await apply_beats(
                db, [beat(r.workspace_id, r.token_hash) for r in due], policy
            )
            assert all(result.status is not None for result in results)
            for runtime in due:
                runtime.failures = 0
                runtime.next_at = now + 1.0
        if outage == "registry-restart" and not down and now >= back_at and not restarted:
            # The registry comes back: a new process, with its own start-up grace.
            sweeper, restarted = _sweeper(settings, clock), True
        if now >= next_sweep:
            next_sweep += SWEEP_EVERY_S
            if not down:
                result = await sweeper.sweep_once(db)
                guard_held = guard_held or result.holding
            elif outage == "database":
                sweeper.unreachable()  # what run_forever does when a sweep cannot connect
    offline_events = await db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE to_status = 'offline'"
    )
    reconciles = await db.fetchval("SELECT count(*) FROM reconciles")
    offline_now = await db.fetchval("SELECT count(*) FROM workspaces WHERE status = 'offline'")
    return Outcome(offline_events, reconciles, offline_now, guard_held)


# The database down under a running registry (its sweeps fail); the registry down and started
# again (a new process); the registry's one process frozen (stopped, its host suspended: it
# sweeps on afterwards as if nothing happened, its start-up grace long past).
OUTAGES = ["database", "registry-restart", "registry-frozen"]


@pytest.mark.parametrize("outage", OUTAGES)
async def test_runtimes_beating_every_second_survive_an_outage(
    db: asyncpg.Connection, settings: Settings, outage: str
) -> None:
    outcome = await run_outage(db, settings, fleet_size=200, backoff=every_second, outage=outage)

    assert (outcome.offline_events, outcome.reconciles) == (0, 0), outcome


@pytest.mark.parametrize("outage", OUTAGES)
async def test_runtimes_backing_off_up_to_16_s_survive_an_outage(
    db: asyncpg.Connection, settings: Settings, outage: str
) -> None:
    outcome = await run_outage(db, settings, fleet_size=200, backoff=backing_off, outage=outage)

    assert (outcome.offline_events, outcome.reconciles) == (0, 0), outcome
    # The window after the outage was not enough for those backing off: the guard held them.
    assert outcome.guard_held
    guard = await db.fetchrow("SELECT holding, stale FROM fleet_guard")
    assert guard is not None
    assert (guard["holding"], guard["stale"]) == (False, 0)  # and let go once all were back


@pytest.mark.parametrize("outage", OUTAGES)
async def test_a_fleet_too_small_for_the_guard_gets_a_window_after_an_outage(
    db: asyncpg.Connection, settings: Settings, outage: str
) -> None:
    # Below the guard's minimum fleet only the grace after the outage protects it: the first
    # sweep after the database came back would judge silences of 20 s.
    outcome = await run_outage(db, settings, fleet_size=8, backoff=every_second, outage=outage)

    assert (outcome.offline_events, outcome.reconciles) == (0, 0), outcome
    assert not outcome.guard_held


@pytest.mark.parametrize("seen_by", ["heartbeat", "sweep"])
async def test_an_outage_seen_by_this_process_gives_every_workspace_a_window(
    db: asyncpg.Connection, settings: Settings, seen_by: str
) -> None:
    """An outage too short for "nobody swept for two intervals" (a 60 s interval here): what
    the process saw, a heartbeat batch refused or a sweep that could not connect, is what
    makes the next sweep count silence afresh."""
    await init_connection(db)
    settings = dataclasses.replace(
        settings,
        offline_after_s=OFFLINE_AFTER_S,
        offline_after_max_s=OFFLINE_AFTER_S,
        sweep_interval_s=60.0,
    )
    runtimes = await _fleet(db, 3, random.Random(1))
    clock = SimClock(db)
    refused = [0]
    sweeper = _sweeper(settings, clock, refused=lambda: refused[0])
    await clock.advance(OFFLINE_AFTER_S + 2.0)  # silent past the window, grace over
    if seen_by == "heartbeat":
        refused[0] += 1  # the ingest's count of batches refused for an unreachable database
    else:
        sweeper.unreachable()

    first = await sweeper.sweep_once(db)
    await clock.advance(OFFLINE_AFTER_S + 0.1)  # a whole window, and nobody called in
    second = await sweeper.sweep_once(db)

    assert first.count(Status.OFFLINE) == 0
    assert second.count(Status.OFFLINE) == len(runtimes)


async def test_heartbeats_refused_for_an_unreachable_database_are_counted_for_the_sweeper(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the app's sweeper reads (app.py wires it): each heartbeat batch refused because
    the database could not be reached."""
    workspace = await registry.create_workspace()
    ingest = registry.client.app[INGEST]
    before = ingest.unreachable_batches

    async def refuse(self: object) -> Any:
        # Raised from a real connect attempt, as a stopped PostgreSQL makes it.
        return await asyncpg.connect("postgresql://postgres@127.0.0.1:1/none", timeout=2)

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.pool.PoolAcquireContext, "__aenter__", refuse)
        response = await registry.client.post(
            "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
        )
    after_outage = ingest.unreachable_batches
    await registry.heartbeat(workspace)  # a beat that gets through counts nothing

    assert response.status == 503
    assert (before, after_outage, ingest.unreachable_batches) == (0, 1, 1)


async def test_fleet_shows_since_when_silence_is_counted_after_nobody_swept(
    make_registry: MakeRegistry, db: asyncpg.Connection
) -> None:
    # No process swept for an hour (all were down): the first sweep of the next one to start
    # counts silence afresh, and /fleet says from when.
    await db.execute("UPDATE fleet_guard SET updated_at = now() - interval '1 hour'")
    registry = await make_registry()

    async def heard_again() -> bool:
        return bool(await db.fetchval("SELECT silence_counted_from IS NOT NULL FROM fleet_guard"))

    deadline = asyncio.get_running_loop().time() + 10.0
    while not await heard_again():
        assert asyncio.get_running_loop().time() < deadline, "the first sweep never ran"
        await asyncio.sleep(0.05)
    response = await registry.client.get("/fleet", headers=ADMIN)
    guard = (await response.json())["mass_expiry_guard"]
    stored = await db.fetchval("SELECT silence_counted_from FROM fleet_guard")

    assert response.status == 200
    assert guard["silence_counted_from"] == stored.isoformat().replace("+00:00", "Z")
    assert guard["released_at"] is None


async def test_the_simulated_clock_ages_by_simulated_seconds_however_slow_the_machine(
    db: asyncpg.Connection,
) -> None:
    # A loaded machine spends real time between steps; it must not count as silence.
    [runtime] = await _fleet(db, 1, random.Random(1))
    clock = SimClock(db)

    async def age_at_last_advance() -> float:
        age: float = await db.fetchval(
            "SELECT extract(epoch FROM $1::timestamptz - last_heartbeat_at)::float8 "
            "FROM workspaces WHERE id = $2",
            clock.last_advance,
            runtime.workspace_id,
        )
        return age

    await clock.advance(1.0)
    before = await age_at_last_advance()
    await asyncio.sleep(0.5)  # real time passing between two steps
    await clock.advance(1.0)
    after = await age_at_last_advance()

    # One simulated second older, to the microsecond; without the compensation 1.5 s.
    assert after - before == pytest.approx(1.0, abs=1e-3)
