"""Connections leave nothing for the cyclic collector: with it switched off, refused (431) and
reset connections are freed by reference counting alone. `serve` runs the full collection
rarely (registry/cli.py), so a cycle per connection is memory held for good under a flood
(registry/protocol.py: the queued parser error's traceback, the body kept to tell a head from
a lingering body, the selector transport's own callback)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from registry.protocol import EnvelopeAppRunner, EnvelopeRequestHandler
from registry.startup import stand_in
from tests.slow_clients import Connection, head, padding


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    runner = EnvelopeAppRunner(stand_in(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1]
    await runner.cleanup()
    await Connection.close_all()


def alive() -> int:
    return sum(isinstance(o, EnvelopeRequestHandler) for o in gc.get_objects())


async def until_none_alive(within_s: float = 5.0) -> None:
    # Less than aiohttp's lingering time (10 s): a reset connection must not wait it out.
    deadline = asyncio.get_running_loop().time() + within_s
    while (count := alive()) > 0:
        assert asyncio.get_running_loop().time() < deadline, f"{count} connections not freed"
        await asyncio.sleep(0.05)


async def test_refused_and_reset_connections_are_freed_without_the_cyclic_collector(
    port: int, no_cyclic_collector: None
) -> None:
    for _ in range(20):  # 431: too many header fields
        refused = await Connection.open(port)
        await refused.send(head("GET", "/healthz", padding(400, 40), None))
        assert (await refused.answer()).status == 431
        assert await refused.closed_by_server()
        refused.close()
    for _ in range(20):  # answered (503 starting) before its body, then gone mid-body
        reset = await Connection.open(port)
        await reset.send(head("POST", "/registry/heartbeat", [], 1000) + b"{")
        assert (await reset.answer()).status == 503
        reset.reset()
    await Connection.close_all()

    await until_none_alive()
