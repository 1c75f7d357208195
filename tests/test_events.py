"""Event history and the Server-Sent-Events stream: ordered, resumable, across processes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import orjson
from aiohttp import ClientResponse

from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, Workspace


async def read_events(response: ClientResponse, count: int, within_s: float = 10.0) -> list[Any]:
    """Read `count` SSE events (skipping comments and retry lines)."""
    events: list[Any] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(within_s):
        while len(events) < count:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    events.append({"id": int(fields["id"]), **orjson.loads(fields["data"])})
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


async def all_numbered(registry: Registry) -> None:
    """Wait until every committed event has its sequence number (the stream's "now")."""
    async with asyncio.timeout(5):
        while await registry.db.fetchval("SELECT count(*) FROM workspace_events WHERE seq IS NULL"):
            await asyncio.sleep(0.02)


async def open_stream(registry: Registry, **headers: str) -> ClientResponse:
    query = headers.pop("query", "")
    response = await registry.client.get(f"/events{query}", headers={**ADMIN, **headers})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    return response


async def test_workspace_events_list_its_history_oldest_first(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    await all_numbered(registry)

    response = await registry.client.get(f"/workspaces/{workspace.id}/events", headers=ADMIN)
    events = (await response.json())["events"]
    after = await registry.client.get(
        f"/workspaces/{workspace.id}/events?after={events[0]['id']}", headers=ADMIN
    )

    assert [(e["kind"], e["from"], e["to"], e["cause"]) for e in events] == [
        ("status", None, "provisioning", "created"),
        ("status", "provisioning", "online", "heartbeat"),
        ("reconcile", None, None, "reconcile_succeeded"),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert (await after.json())["events"] == events[1:]


async def test_stream_delivers_status_changes_and_reconcile_outcomes(registry: Registry) -> None:
    stream = await open_stream(registry)
    workspace = await registry.create_workspace()

    await registry.heartbeat(workspace)
    events = await read_events(stream, 3)

    assert [(e["kind"], e["to"], e["cause"]) for e in events] == [
        ("status", "provisioning", "created"),
        ("status", "online", "heartbeat"),
        ("reconcile", None, "reconcile_succeeded"),
    ]
    assert all(e["workspace_id"] == workspace.id for e in events)
    stream.close()


async def test_stream_filters_by_workspace(registry: Registry) -> None:
    watched, other = await registry.create_workspace(), await registry.create_workspace()
    await all_numbered(registry)
    stream = await open_stream(registry, query=f"?workspace_id={watched.id}")

    await registry.heartbeat(other)
    await registry.heartbeat(watched)
    events = await read_events(stream, 1)

    assert events[0]["workspace_id"] == watched.id
    assert events[0]["to"] == "online"
    stream.close()


async def test_resuming_with_last_event_id_delivers_every_event_exactly_once(
    registry: Registry,
) -> None:
    workspaces = [await registry.create_workspace() for _ in range(3)]
    await all_numbered(registry)
    stream = await open_stream(registry)
    await registry.heartbeat(workspaces[0])
    first = await read_events(stream, 2)  # online + reconcile outcome
    stream.close()

    # While disconnected, more happens.
    for workspace in workspaces[1:]:
        await registry.heartbeat(workspace)
    resumed = await open_stream(registry, **{"Last-Event-ID": str(first[-1]["id"])})
    rest = await read_events(resumed, 4)
    resumed.close()

    everything = first + rest
    ids = [e["id"] for e in everything]
    assert ids == sorted(set(ids))
    assert {(e["workspace_id"], e["kind"]) for e in rest} == {
        (w.id, kind) for w in workspaces[1:] for kind in ("status", "reconcile")
    }


async def test_an_event_that_commits_late_is_not_skipped(registry: Registry, dsn: str) -> None:
    """Ids are taken at insert; a reader resuming by id alone would skip this one."""
    workspace, quiet = await registry.create_workspace(), await registry.create_workspace()
    await all_numbered(registry)
    stream = await open_stream(registry)
    slow = await asyncpg.connect(dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute(
            "INSERT INTO workspace_events (workspace_id, kind, cause, actor) "
            "VALUES ($1, 'reconcile', 'late', 'test')",
            uuid.UUID(quiet.id),
        )
        await registry.heartbeat(workspace)  # a later insert that commits first
        early = await read_events(stream, 2)
        await transaction.commit()
        late = await read_events(stream, 1)
    finally:
        await slow.close()
        stream.close()

    assert [e["cause"] for e in early] == ["heartbeat", "reconcile_succeeded"]
    assert late[0]["cause"] == "late"
    assert late[0]["id"] > early[-1]["id"]


async def test_a_change_made_through_one_process_reaches_a_subscriber_of_another(
    make_registry: MakeRegistry,
) -> None:
    one, two = await make_registry(), await make_registry()
    stream = await open_stream(two)

    workspace = await one.create_workspace()
    events = await read_events(stream, 1)

    assert (events[0]["workspace_id"], events[0]["to"]) == (workspace.id, "provisioning")
    stream.close()


async def test_bad_last_event_id_is_400(registry: Registry) -> None:
    response = await registry.client.get("/events", headers={**ADMIN, "Last-Event-ID": "yesterday"})

    assert response.status == 400


async def test_events_of_unknown_workspace_are_404(registry: Registry) -> None:
    response = await registry.client.get(f"/workspaces/{uuid.uuid4()}/events", headers=ADMIN)

    assert response.status == 404


async def test_stream_needs_the_admin_token(registry: Registry) -> None:
    workspace: Workspace = await registry.create_workspace()

    response = await registry.client.get("/events", headers=workspace.auth)

    assert response.status == 401
