"""Coalesced heartbeat ingestion: the same answers as one statement per beat, in batches."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from registry.db.pool import init_connection
from registry.ingest import HeartbeatIngest
from registry.metrics import Metrics
from tests.conftest import MakeRegistry
from tests.support import Registry, Workspace, beat


async def storm(registry: Registry, fleet: list[Workspace], beats_each: int) -> list[Any]:
    """Concurrent heartbeats in a shuffled order; a fixed seed keeps runs comparable."""
    order = [w for w in fleet for _ in range(beats_each)]
    random.Random(7).shuffle(order)
    return list(await asyncio.gather(*(registry.heartbeat(w) for w in order)))


async def outcome(registry: Registry, results: list[Any]) -> dict[str, Any]:
    flips = sorted(r["workspace_id"] for r in results if r["previous_status"] == "provisioning")
    events = await registry.db.fetch(
        "SELECT w.name, e.from_status, e.to_status FROM workspace_events e "
        "JOIN workspaces w ON w.id = e.workspace_id WHERE e.kind = 'status' "
        "ORDER BY w.name, e.id"
    )
    return {
        "flip_count": len(flips),
        "distinct_flips": len(set(flips)),
        "events": [tuple(e) for e in events],
        "reconciles": await registry.db.fetchval("SELECT count(*) FROM reconciles"),
        "statuses": sorted(
            (r["name"], r["status"])
            for r in await registry.db.fetch("SELECT name, status FROM workspaces")
        ),
    }


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "per-request"])
async def test_concurrent_beats_flip_each_workspace_exactly_once(
    make_registry: MakeRegistry, coalesce: bool
) -> None:
    registry = await make_registry(heartbeat_coalesce=coalesce)
    fleet = [await registry.create_workspace(name=f"w{i:02d}") for i in range(40)]
    for workspace in fleet[:20]:
        await registry.heartbeat(workspace)  # half the fleet is online already

    results = await storm(registry, fleet, beats_each=10)
    seen = await outcome(registry, results)

    assert seen["flip_count"] == seen["distinct_flips"] == 20
    assert seen["reconciles"] == 40
    assert len(seen["events"]) == 40 + 40  # one creation and one flip per workspace
    assert {status for _, status in seen["statuses"]} == {"online"}


async def test_coalesced_and_per_request_modes_agree(make_registry: MakeRegistry) -> None:
    outcomes = []
    for coalesce in (True, False):
        registry = await make_registry(heartbeat_coalesce=coalesce)
        # Runs have no foreign key to their workspace (migration 0017): both go.
        await registry.db.execute("DELETE FROM reconciles; DELETE FROM workspaces")
        fleet = [await registry.create_workspace(name=f"w{i:02d}") for i in range(30)]
        for i, workspace in enumerate(fleet):
            if i % 3 == 0:
                await registry.set_status(workspace, "paused")
            elif i % 3 == 1:
                await registry.heartbeat(workspace, error_rate=0.7)
        outcomes.append(await outcome(registry, await storm(registry, fleet, beats_each=6)))
        # Nothing of this app may still write when the next one clears the tables.
        async with asyncio.timeout(20):
            while await registry.db.fetchval(
                "SELECT count(*) FROM reconciles WHERE status IN ('queued', 'running')"
            ):
                await asyncio.sleep(0.05)

    assert outcomes[0] == outcomes[1]


async def test_concurrent_beats_are_sent_in_batches(registry: Registry) -> None:
    fleet = [await registry.create_workspace() for _ in range(50)]

    await storm(registry, fleet, beats_each=4)

    metrics = await (await registry.client.get("/metrics")).text()
    count = _sample(metrics, "registry_heartbeat_batch_size_count")
    total = _sample(metrics, "registry_heartbeat_batch_size_sum")
    assert total == 200
    assert count < 100  # fewer statements than beats


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.fixture
async def pool(dsn: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=4, init=init_connection) as pool:
        yield pool


async def test_a_bad_beat_does_not_fail_the_rest_of_its_batch(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    ingest = HeartbeatIngest(pool, Metrics(), coalesce=True, max_batch=100, max_in_flight=1)
    ids = [
        await db.fetchval(
            "INSERT INTO workspaces (name, token_hash) "
            "VALUES ('w-' || gen_random_uuid(), $1) RETURNING id",
            bytes([i]) * 32,
        )
        for i in range(10)
    ]
    # A NUL byte cannot be stored in text: this beat's statement fails in the database.
    beats = [beat(id_, bytes([i]) * 32, "\x00" if i == 3 else "") for i, id_ in enumerate(ids)]

    results = await asyncio.gather(*(ingest.apply(b) for b in beats), return_exceptions=True)

    assert isinstance(results[3], asyncpg.PostgresError)
    good = [r for i, r in enumerate(results) if i != 3]
    assert all(getattr(r, "previous_status", None) == "provisioning" for r in good)
    assert await db.fetchval("SELECT count(*) FROM workspaces WHERE status = 'online'") == 9


async def test_two_beats_for_one_workspace_in_one_tick_see_each_other(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    ingest = HeartbeatIngest(pool, Metrics(), coalesce=True, max_batch=100, max_in_flight=1)
    workspace_id = await db.fetchval(
        "INSERT INTO workspaces (name, token_hash) "
        "VALUES ('w-' || gen_random_uuid(), $1) RETURNING id",
        b"k" * 32,
    )

    first, second = await asyncio.gather(
        ingest.apply(beat(workspace_id, b"k" * 32)), ingest.apply(beat(workspace_id, b"k" * 32))
    )

    assert [first.previous_status, second.previous_status] == ["provisioning", "online"]
