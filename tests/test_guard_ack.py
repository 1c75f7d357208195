"""Acknowledging the mass-expiry guard: an `operate` token releases the hold (the sweeper
expires at its normal pace), the acknowledgement lasts as long as that hold, and the `why` of
every workspace the guard protects says which it is."""

from __future__ import annotations

import uuid

import asyncpg

from registry.db.pool import init_connection
from registry.liveness import SweepPolicy, sweep
from tests.hostile_support import assert_error
from tests.support import ADMIN, Registry, bearer

POLICY = SweepPolicy(
    offline_after_s=10.0,
    provision_timeout_s=1e9,
    mass_expiry_share=0.3,
    mass_expiry_min_fleet=10,
    mass_expiry_rate=0.01,  # while holding: 1 per sweep
)


async def silent_fleet(db: asyncpg.Connection, n: int, silent: int) -> list[uuid.UUID]:
    """n online workspaces, the first `silent` of them not heard from for a minute."""
    # Inserted as they are to be, not updated afterwards: an UPDATE of many rows locks them
    # in the order of the heap, and the app's plugins_sync refresher (judging these new
    # workspaces meanwhile) locks them in id order: a deadlock, seen once in CI.
    return [
        await db.fetchval(
            "INSERT INTO workspaces (name, token_hash, status, last_heartbeat_at) "
            "VALUES ($1, $2, 'online', now() - make_interval(secs => $3)) RETURNING id",
            f"w-{i}",
            f"token-{i}".encode(),
            60.0 if i < silent else 0.0,
        )
        for i in range(n)
    ]


async def offline(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM workspaces WHERE status = 'offline'"))


async def operate_token(registry: Registry) -> dict[str, str]:
    response = await registry.client.post(
        "/tokens", json={"name": "oncall", "role": "operate"}, headers=ADMIN
    )
    return bearer((await response.json())["secret"])


async def test_an_acknowledged_guard_lets_the_sweeper_expire_the_silent_fleet(
    registry: Registry,
) -> None:
    db = registry.db
    await init_connection(db)
    await silent_fleet(db, 20, silent=15)
    first = await sweep(db, POLICY)
    assert first.holding
    assert await offline(db) <= 1  # the guard's slow rate (none while the count settles)

    response = await registry.client.post("/fleet/guard/ack", headers=await operate_token(registry))
    second = await sweep(db, POLICY)

    assert response.status == 200, await response.text()
    guard = (await response.json())["mass_expiry_guard"]
    assert (guard["acknowledged"], guard["acknowledged_by"]) == (True, "oncall")
    assert await offline(db) == 15  # every silent one, at once
    # The window still counts those expirations, so the same hold goes on, acknowledged.
    assert second.holding
    row = await db.fetchrow("SELECT acked_by, acked_at >= since AS current FROM fleet_guard")
    assert row is not None
    assert (row["acked_by"], row["current"]) == ("oncall", True)
    event = await db.fetchrow(
        "SELECT kind, actor, detail FROM workspace_events "
        "WHERE cause = 'mass_expiry_guard_acknowledged'"
    )
    assert event is not None
    assert (event["kind"], event["actor"]) == ("audit", "oncall")


async def test_the_acknowledgement_ends_with_its_hold(registry: Registry) -> None:
    db = registry.db
    await init_connection(db)
    ids = await silent_fleet(db, 20, silent=15)
    await sweep(db, POLICY)
    await registry.client.post("/fleet/guard/ack", headers=ADMIN)
    await sweep(db, POLICY)
    # The fleet comes back and the window's expirations age out: the guard lets go.
    await db.execute(
        "UPDATE workspaces SET status = 'online', last_heartbeat_at = now() "
        "WHERE id = ANY($1::uuid[])",
        ids,
    )
    await db.execute("UPDATE fleet_expirations SET at = now() - interval '1 hour'")
    await sweep(db, POLICY)  # sees the silent count drop; lets go once it has been steady
    await db.execute("UPDATE fleet_guard SET silent_changed_at = now() - interval '1 hour'")
    released = await sweep(db, POLICY)
    assert not released.holding
    assert await db.fetchval("SELECT acked_at FROM fleet_guard") is None
    # A new outage holds again: the old acknowledgement does not carry over.
    await db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '60 seconds' "
        "WHERE id = ANY($1::uuid[])",
        ids[:15],
    )
    before = await offline(db)

    again = await sweep(db, POLICY)

    assert again.holding
    assert await offline(db) <= before + 1  # slowed again, not all 15
    assert await db.fetchval("SELECT acked_at FROM fleet_guard") is None


async def test_a_guard_that_is_not_holding_cannot_be_acknowledged(registry: Registry) -> None:
    response = await registry.client.post("/fleet/guard/ack", headers=ADMIN)

    await assert_error(response, 409, "guard_not_holding")
    assert await registry.db.fetchval("SELECT count(*) FROM workspace_events") == 0


async def test_acknowledging_twice_keeps_the_first_acknowledgement(registry: Registry) -> None:
    await registry.db.execute("UPDATE fleet_guard SET holding = true, since = now()")
    await registry.client.post("/fleet/guard/ack", headers=await operate_token(registry))
    first = await registry.db.fetchrow("SELECT acked_at, acked_by FROM fleet_guard")

    response = await registry.client.post("/fleet/guard/ack", headers=ADMIN)

    assert response.status == 200
    assert await registry.db.fetchrow("SELECT acked_at, acked_by FROM fleet_guard") == first


async def test_why_says_the_guard_holds_and_then_that_it_was_acknowledged(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '300 seconds' WHERE id = $1",
        uuid.UUID(workspace.id),
    )
    await registry.db.execute(
        "UPDATE fleet_guard SET holding = true, since = now() - interval '60 seconds', "
        "live = 40, stale = 20"
    )

    held = (await registry.show(workspace))["why"]
    await registry.client.post("/fleet/guard/ack", headers=await operate_token(registry))
    acknowledged = (await registry.show(workspace))["why"]

    assert held.startswith("would be offline: silent for 300 s")
    assert "held online by the mass-expiry guard since 60 s ago" in held
    assert acknowledged.startswith("would be offline: silent for 300 s")
    assert "oncall acknowledged it" in acknowledged
    assert "takes it offline at its next sweep" in acknowledged
