"""Event history and the live stream (admin token), and the fleet's liveness state."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import asyncpg
from aiohttp import web

from registry import query
from registry import validation as v
from registry.auth import caller
from registry.db import Connection, events, fleet, fleet_history, retention, workspaces
from registry.db.errors import DatabaseUnavailable
from registry.db.events import Event
from registry.errors import HistoryPruned, Unauthorized, workspace_not_found
from registry.event_feed import PAGE, Sink, Subscription
from registry.event_frames import (
    KEEPALIVE,
    RETRY,
    dropped_frame,
    event_view,
    frame,
    reset_frame,
    unauthorized_frame,
)
from registry.jsonio import json_response
from registry.keys import EVENT_HUB, FLEET_GAUGES, FLEET_HISTORY, FLEET_STATUSES, POOL, SETTINGS

MAX_EVENTS_PAGE = 500
MAX_EVENT_ID = 2**63 - 1  # event ids are PostgreSQL bigints
# A comment line this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_S = 15.0
DROPPED_GRACE_S = 10.0
# An open stream asks again who its caller is this often (at its next keep-alive tick): a
# token revoked or expired, or a dashboard session ended, since the stream opened ends it
# within this long, with a last `unauthorized` frame. One index probe per stream per minute.
AUTH_RECHECK_S = 60.0


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


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: resumes after Last-Event-ID (or ?after=), else starts from now."""
    workspace_id = query.query_uuid(request, "workspace_id")
    after = _after(request)
    pool = request.app[POOL]
    feed = request.app[EVENT_HUB].feed
    feed.check_room()  # before the database is asked anything
    reset: int | None = None
    async with pool.acquire() as conn:
        now = await events.last_sequence(conn)
        if after is None:
            after = now
        elif 0 < after < (pruned_through := await retention.events_pruned_through(conn)):
            reset, after = pruned_through, pruned_through
    subscription = feed.subscribe(after, now, workspace_id)
    closer: asyncio.TimerHandle | None = None

    def close_later() -> None:
        # The writer may be stuck on a client that stopped reading; it gets this long to
        # send the `dropped` frame, then the connection is closed under it.
        nonlocal closer
        transport = request.transport
        if transport is not None:
            closer = asyncio.get_running_loop().call_later(DROPPED_GRACE_S, _hang_up, transport)

    subscription.on_drop = close_later
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the subscriber went away
            await response.write(RETRY if reset is None else RETRY + reset_frame(reset))
            await _catch_up(pool, response, subscription)
            allowed = _Recheck(request)
            if request.app[SETTINGS].event_direct_writes and request.transport is not None:
                await _stream_live(response, request.transport, subscription, allowed)
            else:
                await _follow(response, subscription, allowed)
            if allowed.refusal is not None:
                feed.unsubscribe(subscription)  # the feed writes it nothing more
                refusal = allowed.refusal
                await response.write(unauthorized_frame(refusal.code, refusal.message))
        with contextlib.suppress(Exception):
            await response.write_eof()
        return response
    finally:
        feed.unsubscribe(subscription)
        if closer is not None:
            closer.cancel()


def _hang_up(transport: asyncio.BaseTransport) -> None:
    """Close; a socket still holding unsent bytes (a client that never reads) is aborted, as
    closing would wait for it to read them. A client that reconnects with Last-Event-ID
    misses nothing either way."""
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


async def _catch_up(pool: asyncpg.Pool, response: web.StreamResponse, sub: Subscription) -> None:
    """What the subscriber missed before the feed took over: its own reads, once."""
    cursor = sub.last_id
    while cursor < sub.split:
        async with pool.acquire() as conn:
            page = await events.events_between(
                conn, cursor, sub.split, workspace_id=sub.workspace_id, limit=PAGE
            )
        if page:
            await response.write(b"".join(frame(event) for event in page))
            sub.caught_up_to(page[-1].id)
        if len(page) < PAGE:
            return
        cursor = page[-1].id


class _Recheck:
    """Whether the stream's caller is still allowed, asked at most every AUTH_RECHECK_S."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + AUTH_RECHECK_S
        self.refusal: Unauthorized | None = None

    async def still_allowed(self) -> bool:
        if self._loop.time() < self._due:
            return True
        try:
            await caller(self._request)  # every role may read the stream
        except Unauthorized as refusal:
            self.refusal = refusal
            return False
        except DatabaseUnavailable:
            # Asked again at the next tick. Nothing new reaches the stream meanwhile: the
            # feed reads its events from the same database.
            return True
        self._due = self._loop.time() + AUTH_RECHECK_S
        return True


async def _stream_live(
    response: web.StreamResponse,
    transport: asyncio.Transport,
    sub: Subscription,
    allowed: _Recheck,
) -> None:
    """Hand the socket to the feed, which writes each page to it in its one pass; here only
    keep-alives when idle, until the stream ends (dropped, gone, the registry stopping, or
    its caller no longer allowed)."""
    # aiohttp frames the body in chunks for HTTP/1.1 (no length is known); the feed frames
    # its writes the same way, and write_eof ends the chunks as usual.
    sub.go_live(Sink(transport, chunked=response.headers.get("Transfer-Encoding") == "chunked"))
    while not await sub.wait_ended(KEEPALIVE_S):
        if not await allowed.still_allowed():
            return
        sub.keepalive(KEEPALIVE)
    if sub.dropped and not sub.live:  # dropped while catching up: not told yet
        await response.write(dropped_frame(sub.last_id))


async def _follow(response: web.StreamResponse, sub: Subscription, allowed: _Recheck) -> None:
    """Frames from the feed as they come (each batch one write), keep-alives when idle."""
    while True:
        frames = await sub.take(KEEPALIVE_S)
        if sub.closed or not await allowed.still_allowed():
            return
        if sub.dropped:
            await response.write(dropped_frame(sub.last_id))
            return
        await response.write(b"".join(frames) if frames else KEEPALIVE)


# Dashboards re-read /fleet every half second while events flow: even with /metrics reading
# on every scrape (REGISTRY_METRICS_CACHE_S=0), the counts by plugins sync are read at most
# this often per process.
FLEET_SYNC_MIN_AGE_S = 5.0


async def get_fleet(request: web.Request) -> web.Response:
    """Counts by status (shared by this process's callers: at most REGISTRY_FLEET_CACHE_S
    old, registry/fleet_statuses.py) and by plugins sync (from /metrics' cached read of the
    fleet's gauges: at 100k workspaces that read costs the database ~1 s, too much for every
    page refresh; REGISTRY_METRICS_CACHE_S bounds their age), and the mass-expiry guard's
    state (read on each request: one row)."""
    pool = request.app[POOL]
    async with pool.acquire() as conn:
        guard = await fleet.read_guard(conn)
    counts = await request.app[FLEET_STATUSES].counts()
    gauges = request.app[FLEET_GAUGES]
    await gauges.refresh(pool, min_ttl_s=FLEET_SYNC_MIN_AGE_S)
    if gauges.counts is None:  # never read: the database failed that read just now
        raise DatabaseUnavailable("the fleet's counts by plugins sync could not be read")
    return json_response(
        {
            "statuses": counts,
            "plugins_sync": gauges.counts.by_sync,
            "mass_expiry_guard": guard_view(guard),
        }
    )


MAX_HISTORY_MINUTES = 60


async def get_fleet_history(request: web.Request) -> web.Response:
    """Status counts a minute apart over the last `minutes` (the dashboard's chart), rebuilt
    from the event log in one read (shared for HISTORY_CACHE_S by every dashboard of this
    process): cheaper than paging through an hour of /events/history."""
    minutes = query.query_int(
        request, "minutes", MAX_HISTORY_MINUTES, minimum=1, maximum=MAX_HISTORY_MINUTES
    )
    points = await request.app[FLEET_HISTORY].points(request.app[POOL], minutes)
    return json_response(
        {
            "bucket_s": fleet_history.BUCKET_S,
            "points": [{"at": p.at, "statuses": p.statuses} for p in points],
        }
    )


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
