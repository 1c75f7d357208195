"""The app's lifetime: a start that fails at any step releases what it opened, and teardown is
bounded even by a connection that is never returned.

The app is started as `registry serve` starts it (`registry.startup._started`), against the
real database. A failure is injected at one step by replacing what the app calls at that step;
afterwards no connection of the test database may be left open, every delivery session must be
closed and no task may be left running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
import aiojobs
import asyncpg
import pytest

import registry.app
from registry.keys import POOL
from registry.liveness import LivenessSweeper
from registry.retention import Pruner
from registry.settings import Settings
from registry.startup import _started

# Only a guard against a hang; teardown normally takes a fraction of it.
HANG_S = 15.0


class Injected(Exception):
    """The failure a test plants at one start step."""


class Watch:
    """What the app opened that the tests can see from outside: its delivery sessions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sessions: list[aiohttp.ClientSession] = []
        self.schedulers: list[aiojobs.Scheduler] = []
        real_session, real_spawn = aiohttp.ClientSession, aiojobs.Scheduler.spawn

        def session(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
            made = real_session(*args, **kwargs)
            self.sessions.append(made)
            return made

        async def spawn(
            scheduler: aiojobs.Scheduler, coro: Coroutine[Any, Any, Any], name: str | None = None
        ) -> Any:
            if scheduler not in self.schedulers:
                self.schedulers.append(scheduler)
            return await real_spawn(scheduler, coro, name=name)

        monkeypatch.setattr(aiohttp, "ClientSession", session)
        monkeypatch.setattr(aiojobs.Scheduler, "spawn", spawn)


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    return Watch(monkeypatch)


async def open_connections(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return count


async def assert_nothing_left(db: asyncpg.Connection, watch: Watch) -> None:
    assert all(session.closed for session in watch.sessions)
    assert all(scheduler.closed for scheduler in watch.schedulers)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    # A terminated connection's server process goes away just after the client closed it.
    async with asyncio.timeout(HANG_S):
        while await open_connections(db):
            await asyncio.sleep(0.02)


def raising(*_: Any, **__: Any) -> Any:
    raise Injected("injected at this start step")


# Each step of the start the app calls by this name in registry/app.py, in start order.
CALLED_STEPS = [
    "create_pool",
    "create_heartbeat_pool",
    "HeartbeatIngest",
    "Reconciler",
    "ReconcileWorker",
    "LivenessSweeper",
    "EventHub",
    "Pruner",
]
LOOPS = 7


@pytest.mark.parametrize("step", CALLED_STEPS)
async def test_a_failing_start_step_leaks_nothing(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    monkeypatch.setattr(registry.app, step, raising)

    with pytest.raises(Injected):
        await _started(settings, dsn)

    await assert_nothing_left(db, watch)


@pytest.mark.parametrize("constructor", ["ClientSession", "Scheduler"])
async def test_a_failing_session_or_scheduler_leaks_nothing(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
    constructor: str,
) -> None:
    monkeypatch.setattr(
        aiohttp if constructor == "ClientSession" else aiojobs, constructor, raising
    )

    with pytest.raises(Injected):
        await _started(settings, dsn)

    await assert_nothing_left(db, watch)


@pytest.mark.parametrize("failing", range(LOOPS))
async def test_a_failing_spawn_stops_the_loops_started_so_far(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
    failing: int,
) -> None:
    spawn = aiojobs.Scheduler.spawn  # the watching one
    started: list[aiojobs.Job[Any]] = []

    async def spawn_or_fail(
        scheduler: aiojobs.Scheduler, coro: Coroutine[Any, Any, Any], name: str | None = None
    ) -> Any:
        if len(started) == failing:
            coro.close()  # never run, so never awaited: say so to Python
            raise Injected(f"spawn {failing} failed")
        job = await spawn(scheduler, coro, name=name)
        started.append(job)
        return job

    monkeypatch.setattr(aiojobs.Scheduler, "spawn", spawn_or_fail)

    with pytest.raises(Injected):
        await _started(settings, dsn)

    assert len(started) == failing
    assert all(job.closed for job in started)
    await assert_nothing_left(db, watch)


async def test_a_clean_start_and_stop_leaks_nothing(
    settings: Settings, dsn: str, db: asyncpg.Connection, watch: Watch
) -> None:
    runner = await _started(settings, dsn)
    assert len(watch.sessions) == 1
    async with asyncio.timeout(HANG_S):
        await runner.cleanup()
    await assert_nothing_left(db, watch)


async def test_a_loop_that_crashed_does_not_cut_the_teardown_short(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crashed = asyncio.Event()

    async def crash(self: object) -> None:
        crashed.set()
        raise Injected("the sweeper crashed")

    monkeypatch.setattr(LivenessSweeper, "run_forever", crash)
    runner = await _started(settings, dsn)
    await crashed.wait()

    async with asyncio.timeout(HANG_S):
        await runner.cleanup()

    await assert_nothing_left(db, watch)


async def test_a_connection_never_returned_does_not_hold_the_teardown(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(registry.app, "POOL_CLOSE_S", 0.5)
    runner = await _started(settings, dsn)
    await runner.app[POOL].acquire()  # and never released

    with caplog.at_level(logging.WARNING, logger="registry.app"):
        async with asyncio.timeout(HANG_S):
            await runner.cleanup()

    assert "main pool: a connection was not returned" in caplog.text
    await assert_nothing_left(db, watch)


async def test_a_loop_that_does_not_stop_is_cancelled_and_the_teardown_goes_on(
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry.app, "LOOP_STOP_S", 0.2)
    running = asyncio.Event()

    async def deaf(self: object) -> None:
        running.set()
        await asyncio.Event().wait()  # ignores its stop; only cancellation ends it

    monkeypatch.setattr(Pruner, "run_forever", deaf)
    runner = await _started(settings, dsn)
    await running.wait()

    async with asyncio.timeout(HANG_S):
        await runner.cleanup()

    await assert_nothing_left(db, watch)
