"""Event history and the live stream (admin token), and the fleet's liveness state."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from aiohttp import web

from registry import query
from registry import validation as v
from registry.db import Connection, events, fleet, retention, workspaces
from registry.db.events import Event
from registry.errors import HistoryPruned, workspace_not_found
from registry.jsonio import dumps, json_response
from registry.keys import EVENT_HUB, POOL

MAX_EVENTS_PAGE = 500
MAX_EVENT_ID = 2**63 - 1  # event ids are PostgreSQL bigints
# A comment line this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_S = 15.0


def event_view(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "workspace_id": event.workspace_id,
        "kind": event.kind,
        "from": event.from_status,
        "to": event.to_status,
        "cause": event.cause,
        "actor": event.actor,
        "detail": event.detail,
        "at": event.at,
    }


def _event_id(raw: str | None, field: str) -> int | None:
    if raw is None:
        return None
    return query.canonical_int(raw, field, minimum=0, maximum=MAX_EVENT_ID, what="an event id")


def _after(request: web.Request) -> int | None:
    """Where to resume. Both spellings are checked when both are sent; the header wins, as
    it is what an EventSource sends when it reconnects to a URL that still carries `after`."""
    from_query = _event_id(query.query_text(request, "after"), "after")
    from_header = _event_id(query.header_text(request, "Last-Event-ID"), "Last-Event-ID")
    return from_header if from_header is not None else from_query


async def get_workspace_events(request: web.Request) -> web.Response:
    workspace_id = v.path_uuid(request)
    after = _after(request) or 0
    limit = query.query_int(request, "limit", 100, minimum=1, maximum=MAX_EVENTS_PAGE)
    async with request.app[POOL].acquire() as conn:
        if not await workspaces.workspace_exists(conn, workspace_id):
            raise workspace_not_found(workspace_id)
        page = await _history_page(conn, after, workspace_id, limit)
    return json_response({"events": [event_view(e) for e in page]})


async def get_event_history(request: web.Request) -> web.Response:
    """The fleet's history (or one workspace's) as JSON pages, each event with its
    workspace's name: what `registry events` prints without --follow."""
    workspace_id = query.query_uuid(request, "workspace_id")
    after = _after(request) or 0
    limit = query.query_int(request, "limit", 100, minimum=1, maximum=MAX_EVENTS_PAGE)
    async with request.app[POOL].acquire() as conn:
        # A filter, as on the stream: an unknown workspace has no events (the per-workspace
        # route, where the id is the resource, answers 404).
        page = await _history_page(conn, after, workspace_id, limit)
        names = await workspaces.names_of(
            conn, {e.workspace_id for e in page if e.workspace_id is not None}
        )
    return json_response(
        {
            "events": [
                {
                    **event_view(e),
                    "workspace_name": names.get(e.workspace_id) if e.workspace_id else None,
                }
                for e in page
            ],
            "next_after": page[-1].id if len(page) == limit else None,
        }
    )


def _name(names: dict[uuid.UUID, str], workspace_id: uuid.UUID | None) -> str | None:
    return None if workspace_id is None else names.get(workspace_id)


async def _history_page(
    conn: Connection, after: int, workspace_id: uuid.UUID | None, limit: int
) -> list[Event]:
    """A page of events after `after`; 410 when what was asked for may have been pruned."""
    pruned_through = await retention.events_pruned_through(conn)
    if 0 < after < pruned_through:
        raise HistoryPruned(
            f"events up to {pruned_through} may have been pruned: read the current state, "
            "then resume from the oldest event this route returns",
            field="after",
        )
    return await events.events_after(conn, after, workspace_id=workspace_id, limit=limit)


def _reset_frame(pruned_through: int) -> bytes:
    """Tells a resuming client that events after its Last-Event-ID may have been pruned; the
    stream goes on after `pruned_through`, which is also this frame's id."""
    data = {"reason": "history_pruned", "pruned_through": pruned_through}
    return b"id: %d\nevent: reset\ndata: %s\n\n" % (pruned_through, dumps(data))


def _frame(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.id,
        event.kind.encode(),
        dumps(event_view(event)),
    )


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: resumes after Last-Event-ID (or ?after=), else starts from now."""
    workspace_id = query.query_uuid(request, "workspace_id")
    after = _after(request)
    pool = request.app[POOL]
    hub = request.app[EVENT_HUB]
    reset: int | None = None
    async with pool.acquire() as conn:
        if after is None:
            after = await events.last_sequence(conn)
        elif 0 < after < (pruned_through := await retention.events_pruned_through(conn)):
            reset, after = pruned_through, pruned_through
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    hub.subscribers += 1
    try:
        # The client reconnects after this long if the stream drops.
        await response.write(b"retry: 1000\n\n")
        if reset is not None:
            await response.write(_reset_frame(reset))
        idle_s = 0.0
        while not hub.stopping:
            async with pool.acquire() as conn:
                page = await events.events_after(
                    conn, after, workspace_id=workspace_id, limit=MAX_EVENTS_PAGE
                )
            for event in page:
                await response.write(_frame(event))
                after = event.id
            if len(page) == MAX_EVENTS_PAGE:
                continue
            if page:
                idle_s = 0.0
            elif idle_s >= KEEPALIVE_S:
                await response.write(b": keepalive\n\n")
                idle_s = 0.0
            await hub.wait_for_change()
            idle_s += 1.0
    except (ConnectionResetError, ConnectionError):
        pass  # the subscriber went away
    finally:
        hub.subscribers -= 1
        with contextlib.suppress(Exception):
            await response.write_eof()
    return response


async def get_fleet(request: web.Request) -> web.Response:
    """Counts by status and the mass-expiry guard's state."""
    async with request.app[POOL].acquire() as conn:
        guard = await fleet.read_guard(conn)
        counts = await fleet.status_counts(conn)
    return json_response({"statuses": counts, "mass_expiry_guard": guard_view(guard)})


def guard_view(guard: fleet.Guard) -> dict[str, Any]:
    return {
        "holding": guard.holding,
        "since": guard.since,
        "live": guard.live,
        "silent": guard.stale,
        "expired": guard.expired,
        "updated_at": guard.updated_at,
        "silence_counted_from": guard.silence_counted_from,
        "released_at": guard.released_at,
        "acknowledged": guard.acknowledged,
        "acknowledged_at": guard.acked_at if guard.acknowledged else None,
        "acknowledged_by": guard.acked_by if guard.acknowledged else None,
    }
