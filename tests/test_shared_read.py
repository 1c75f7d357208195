"""registry/shared_read.py: one read shared by every caller, and GET /fleet's counts by status
served from it (REGISTRY_FLEET_CACHE_S)."""

from __future__ import annotations

import asyncio
import time

import pytest

from registry.shared_read import SharedRead
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counter:
    """A read that counts its calls and can be held open or made to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> int:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the database said no")
        return self.calls


async def test_callers_within_the_ttl_share_one_read() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, clock=clock)

    assert [await shared.get() for _ in range(5)] == [1] * 5
    clock.now += 1.0
    assert await shared.get() == 2
    assert read.calls == 2


async def test_a_caller_that_accepts_an_older_value_shares_the_last_read() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, clock=clock)

    assert await shared.get() == 1
    clock.now += 3.0  # past the figure's own ttl, within the caller's
    assert await shared.get(min_ttl_s=5.0) == 1
    assert read.calls == 1
    assert await shared.get() == 2  # a caller with the figure's own ttl reads again
    clock.now += 3.0
    assert await shared.get(min_ttl_s=2.0) == 3  # a longer ttl, but not long enough


async def test_callers_arriving_during_a_read_wait_for_it_and_share_it() -> None:
    read = Counter()
    read.gate = asyncio.Event()
    shared = SharedRead(read, ttl_s=1.0, clock=Clock())

    waiting = [asyncio.create_task(shared.get()) for _ in range(10)]
    await asyncio.sleep(0)
    read.gate.set()

    assert await asyncio.gather(*waiting) == [1] * 10
    assert read.calls == 1


async def test_with_no_ttl_every_caller_gets_a_read_that_started_after_it_asked() -> None:
    clock, read = Clock(), Counter()
    read.gate = asyncio.Event()
    shared = SharedRead(read, ttl_s=0.0, clock=clock)

    first = asyncio.create_task(shared.get())
    await asyncio.sleep(0)  # the first read is under way
    clock.now += 0.001
    second = asyncio.create_task(shared.get())
    await asyncio.sleep(0)
    read.gate.set()

    assert (await first, await second) == (1, 2)


async def test_a_stale_value_is_answered_at_once_and_read_again_in_the_background() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, stale_s=10.0, clock=clock)
    assert await shared.get() == 1

    clock.now += 5.0
    read.gate = asyncio.Event()  # the background read stays open until we say
    assert await shared.get() == 1  # not waiting for the read it started
    assert await shared.get() == 1  # nor starting a second one
    await asyncio.sleep(0)
    assert read.calls == 2  # the one background read, under way
    read.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await shared.get() == 2  # the background read's value, fresh now
    assert read.calls == 2


async def test_a_failed_background_read_keeps_the_last_value_and_is_retried() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, stale_s=10.0, clock=clock)
    assert await shared.get() == 1

    clock.now += 2.0
    read.fail = True
    assert await shared.get() == 1
    for _ in range(3):
        await asyncio.sleep(0)
    assert await shared.get() == 1  # kept; the next caller past the ttl tried again
    for _ in range(3):
        await asyncio.sleep(0)
    assert read.calls == 3

    # Older than stale_s: a caller waits for a read, and gets its error.
    clock.now += 10.0
    with pytest.raises(RuntimeError):
        await shared.get()
    read.fail = False
    assert await shared.get() == 5


async def test_after_invalidate_the_next_caller_waits_for_a_new_read() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, stale_s=10.0, clock=clock)
    assert await shared.get() == 1

    # A read under way when the figure changes is not answered afterwards either.
    clock.now += 2.0
    read.gate = asyncio.Event()
    assert await shared.get() == 1  # stale: answered, read again in the background
    await asyncio.sleep(0)
    clock.now += 0.001
    shared.invalidate()
    read.gate.set()
    read.gate = None
    for _ in range(3):
        await asyncio.sleep(0)

    assert await shared.get() == 3
    assert await shared.get() == 3  # fresh again: shared
    assert read.calls == 3


async def test_close_cancels_a_background_read() -> None:
    clock, read = Clock(), Counter()
    shared = SharedRead(read, ttl_s=1.0, stale_s=10.0, clock=clock)
    await shared.get()
    clock.now += 2.0
    read.gate = asyncio.Event()  # never set: the read would hang
    await shared.get()
    await asyncio.sleep(0)

    await asyncio.wait_for(shared.close(), 5)


async def _provisioning_count(registry: Registry) -> int:
    response = await registry.client.get("/fleet", headers=ADMIN)
    assert response.status == 200
    statuses: dict[str, int] = (await response.json())["statuses"]
    return statuses.get("provisioning", 0)


async def test_fleet_counts_are_shared_and_recounted_in_the_background(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(fleet_cache_s=3600.0)
    before = await _provisioning_count(registry)
    await registry.create_workspace()

    # Within a second: the count just made; after it, the same count answered at once while
    # it is counted again in the background; soon the new count.
    assert await _provisioning_count(registry) == before
    deadline = time.monotonic() + 10
    while (seen := await _provisioning_count(registry)) == before:
        assert time.monotonic() < deadline, "the count was never read again"
        await asyncio.sleep(0.2)
    assert seen == before + 1


async def test_fleet_counts_with_no_cache_are_exact_on_each_request(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(fleet_cache_s=0.0)
    before = await _provisioning_count(registry)
    await registry.create_workspace()
    assert await _provisioning_count(registry) == before + 1
