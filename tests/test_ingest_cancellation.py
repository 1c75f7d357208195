"""The heartbeat coalescer under cancellation: whatever is cancelled when, no slot leaks.

A request can be cancelled at any await of the hand-over (a client hanging up with aiohttp's
handler cancellation on, which the test server enables; a timeout around the call). Each test
stops one beat at one point, deterministically: a statement is held in the database by a row
lock, and the other points are reached by counting loop ticks. Afterwards no slot may be
counted as taken and new beats must still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from registry.db.errors import DatabaseUnavailable
from registry.db.heartbeats import BeatResult
from registry.db.pool import init_connection
from registry.ingest import LEAD, HeartbeatIngest
from registry.keys import INGEST
from registry.metrics import Metrics
from tests.conftest import MakeRegistry
from tests.support import beat

# Only a guard against a hang: every wait below ends by an event, not by time.
HANG_S = 10.0


@pytest.fixture
async def pool(dsn: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=4, init=init_connection) as pool:
        yield pool


@pytest.fixture
def ingest(pool: asyncpg.Pool) -> HeartbeatIngest:
    # One slot: every hand-over goes through the one beat holding it.
    return HeartbeatIngest(pool, Metrics(), coalesce=True, max_batch=100, max_in_flight=1)


class Fleet:
    def __init__(self, db: asyncpg.Connection, dsn: str) -> None:
        self.db = db
        self.dsn = dsn
        self.ids: list[uuid.UUID] = []

    async def add(self, count: int) -> None:
        for _ in range(count):
            i = len(self.ids)
            self.ids.append(
                await self.db.fetchval(
                    "INSERT INTO workspaces (name, token_hash) VALUES ($1, $2) RETURNING id",
                    f"w{i}",
                    bytes([i]) * 32,
                )
            )

    def beat(self, i: int, sample_error: str = "") -> Any:
        return beat(self.ids[i], bytes([i]) * 32, sample_error)

    @contextlib.asynccontextmanager
    async def locked(self, i: int) -> AsyncIterator[None]:
        """Workspace i's row locked by another transaction: a statement touching it waits."""
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE", self.ids[i])
                yield
        finally:
            await conn.close()

    async def until_a_statement_waits(self) -> None:
        async with asyncio.timeout(HANG_S):
            while not await self.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.01)


@pytest.fixture
async def fleet(db: asyncpg.Connection, dsn: str) -> Fleet:
    fleet = Fleet(db, dsn)
    await fleet.add(6)
    return fleet


async def ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def cancelled(task: asyncio.Task[BeatResult]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def assert_no_slot_leaked(ingest: HeartbeatIngest, fleet: Fleet) -> None:
    assert ingest._in_flight == 0
    assert ingest._pending == []
    # New beats still complete, more than one at a time (two leaked slots would hang them).
    async with asyncio.timeout(HANG_S):
        results = await asyncio.gather(*(ingest.apply(fleet.beat(i)) for i in range(4, 6)))
    assert [r.status for r in results] == ["online", "online"]
    assert ingest._in_flight == 0


def launch(ingest: HeartbeatIngest, fleet: Fleet, i: int, error: str = "") -> asyncio.Task[Any]:
    return asyncio.ensure_future(ingest.apply(fleet.beat(i, error)))


async def test_a_waiting_beat_cancelled_before_it_is_told_to_lead(
    ingest: HeartbeatIngest, fleet: Fleet
) -> None:
    # Never leaked a slot; what this adds is that the cancelled beat is forgotten at once
    # rather than at the next batch.
    async with fleet.locked(0):
        leader = launch(ingest, fleet, 0)
        await fleet.until_a_statement_waits()
        waiting = launch(ingest, fleet, 1)
        await ticks(1)
        await cancelled(waiting)
    async with asyncio.timeout(HANG_S):
        assert (await leader).status == "online"
    await assert_no_slot_leaked(ingest, fleet)


async def test_a_beat_told_to_lead_and_cancelled_before_it_resumes(
    ingest: HeartbeatIngest, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks: dict[uuid.UUID, asyncio.Task[Any]] = {}
    told: list[uuid.UUID] = []
    pass_slot = ingest._pass_slot

    def pass_slot_then_cancel() -> None:
        # In the very tick the slot is handed over: the beat told to lead is cancelled
        # before it can resume (the case).
        pass_slot()
        for pending in ingest._pending:
            id_ = pending.beat.workspace_id
            if pending.future.done() and pending.future.result() is LEAD and id_ not in told:
                if not told:
                    tasks[id_].cancel()
                told.append(id_)

    monkeypatch.setattr(ingest, "_pass_slot", pass_slot_then_cancel)
    async with fleet.locked(0):
        leader = launch(ingest, fleet, 0)
        await fleet.until_a_statement_waits()
        for i in (1, 2):
            tasks[fleet.ids[i]] = launch(ingest, fleet, i)
        await ticks(1)

    async with asyncio.timeout(HANG_S):
        assert (await leader).status == "online"
        with pytest.raises(asyncio.CancelledError):
            await tasks[fleet.ids[1]]
        # The next in line got the slot the cancelled beat never used.
        assert (await tasks[fleet.ids[2]]).status == "online"
    assert told == [fleet.ids[1], fleet.ids[2]]
    await assert_no_slot_leaked(ingest, fleet)


async def test_a_beat_cancelled_after_resuming_to_lead_before_its_batch(
    ingest: HeartbeatIngest, fleet: Fleet
) -> None:
    async with fleet.locked(0):
        leader = launch(ingest, fleet, 0)
        await fleet.until_a_statement_waits()
        waiting = launch(ingest, fleet, 1)
        behind = launch(ingest, fleet, 2)
        await ticks(1)
        [pending] = [p for p in ingest._pending if p.beat.workspace_id == fleet.ids[1]]
        seen: list[object] = []

        def cancel_once_resumed(_: object) -> None:
            # Scheduled after the beat's own wake-up: it has resumed, replaced its future and
            # is at its first await inside `_lead`.
            seen.append(pending.future.done())
            waiting.cancel()

        pending.future.add_done_callback(cancel_once_resumed)

    async with asyncio.timeout(HANG_S):
        assert (await leader).status == "online"
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await behind).status == "online"
    assert seen == [False]  # its LEAD future was already replaced: it had resumed
    await assert_no_slot_leaked(ingest, fleet)


async def test_a_leader_cancelled_at_its_first_tick(ingest: HeartbeatIngest, fleet: Fleet) -> None:
    leader = launch(ingest, fleet, 0)
    waiting = launch(ingest, fleet, 1)
    await ticks(1)  # the leader waits for its tick's beats to join; the other one waits
    assert ingest._in_flight == 1
    await cancelled(leader)
    async with asyncio.timeout(HANG_S):
        assert (await waiting).status == "online"
    await assert_no_slot_leaked(ingest, fleet)


async def test_a_leader_cancelled_during_its_statement(
    ingest: HeartbeatIngest, fleet: Fleet
) -> None:
    async with fleet.locked(0):
        leader = launch(ingest, fleet, 0)
        in_batch = launch(ingest, fleet, 1)
        await fleet.until_a_statement_waits()
        later = launch(ingest, fleet, 2)
        await ticks(1)
        await cancelled(leader)
        async with asyncio.timeout(HANG_S):
            # Its batch is answered (a 503-class error), the next beat leads at once.
            with pytest.raises(DatabaseUnavailable):
                await in_batch
            assert (await later).status == "online"
    await assert_no_slot_leaked(ingest, fleet)


async def test_a_leader_cancelled_while_retrying_its_batch_one_by_one(
    ingest: HeartbeatIngest, fleet: Fleet
) -> None:
    async with fleet.locked(1):
        # Beat 0 cannot be stored (a NUL byte), so the batch is retried one by one; the
        # retry of beat 1 waits for the lock, and beat 2's turn has not come when the
        # leader is cancelled.
        leader = launch(ingest, fleet, 0, "\x00")
        rest = [launch(ingest, fleet, i) for i in (1, 2)]
        await fleet.until_a_statement_waits()
        await cancelled(leader)
        async with asyncio.timeout(HANG_S):
            answers = await asyncio.gather(*rest, return_exceptions=True)
    assert [type(a) for a in answers] == [DatabaseUnavailable, DatabaseUnavailable]
    await assert_no_slot_leaked(ingest, fleet)


def _heartbeat(workspace_id: str, token: str) -> tuple[str, dict[str, Any]]:
    return "/registry/heartbeat", {
        "json": {"workspace_id": workspace_id},
        "headers": {"Authorization": f"Bearer {token}"},
    }


async def test_clients_hanging_up_mid_beat_with_handler_cancellation_leak_no_slot(
    make_registry: MakeRegistry, dsn: str
) -> None:
    # End to end: aiohttp's test server runs with handler_cancellation=True, so a client that
    # hangs up cancels its handler wherever its beat is. Which hand-over point the network's
    # timing hits is not controlled here; the tests above reach each point deterministically.
    registry = await make_registry(heartbeat_max_in_flight=1)
    ingest = registry.client.app[INGEST]
    workspaces = [await registry.create_workspace() for _ in range(4)]
    fleet = Fleet(registry.db, dsn)
    fleet.ids = [uuid.UUID(w.id) for w in workspaces]

    def post(i: int) -> asyncio.Task[Any]:
        path, kwargs = _heartbeat(workspaces[i].id, workspaces[i].token)
        return asyncio.ensure_future(registry.client.post(path, **kwargs))

    async with fleet.locked(0):
        leader = post(0)
        await fleet.until_a_statement_waits()
        waiting = post(1)
        async with asyncio.timeout(HANG_S):
            while len(ingest._pending) < 1:
                await asyncio.sleep(0.01)
        # Both clients hang up: the leader mid-statement, the other one while it waits.
        leader.cancel()
        waiting.cancel()
        async with asyncio.timeout(HANG_S):
            while ingest._in_flight:
                await asyncio.sleep(0.01)
    async with asyncio.timeout(HANG_S):
        for workspace in workspaces[2:]:
            await registry.heartbeat(workspace)
    assert ingest._in_flight == 0
    assert ingest._pending == []
