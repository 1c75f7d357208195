"""The event stream's one feed per process: shared reads, in-memory filters, bounded queues
(slow subscribers dropped and told), the subscriber cap, and exactly-once hand-over from a
subscriber's own catch-up to the feed."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse

from registry import event_feed
from registry.db import events
from registry.db import pool as db_pool
from registry.db.pool import create_pool
from registry.event_feed import EventFeed
from registry.handlers import events as event_handlers
from registry.keys import EVENT_HUB
from registry.settings import Settings
from tests.conftest import MakeRegistry
from tests.support import ADMIN
from tests.test_events import all_numbered, open_stream, read_events

# Every statement that reads events for the stream, the old per-subscriber ones included.
EVENT_READS = {
    events.SELECT_EVENTS_AFTER,
    events.SELECT_WORKSPACE_EVENTS_AFTER,
    events.SELECT_EVENTS_BETWEEN,
    events.SELECT_WORKSPACE_EVENTS_BETWEEN,
}


async def insert_event(db: asyncpg.Connection, workspace_id: str, detail: Any = None) -> None:
    """One committed event, as any writer makes them; the sequencer numbers it."""
    await db.execute(
        "INSERT INTO workspace_events (workspace_id, kind, cause, actor, detail) "
        "VALUES ($1, 'reconcile', 'test', 'test', $2::jsonb)",
        uuid.UUID(workspace_id),
        None if detail is None else orjson.dumps(detail).decode(),
    )


def sse_ids(pages: list[bytes]) -> list[int]:
    """The ids of the frames in pages of frames (a subscriber is given a page's at once)."""
    return [
        int(f.split(b"\n", 1)[0].removeprefix(b"id: "))
        for page in pages
        for f in page.split(b"\n\n")
        if f
    ]


# --- the feed itself, driven step by step on a real database -------------------------------


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every event read the app's pooled connections run, as PostgreSQL receives it (asyncpg's
    query logger on each connection the pools open)."""
    seen: list[str] = []
    init = db_pool.init_connection

    async def logging_init(conn: asyncpg.Connection) -> None:
        await init(conn)
        conn.add_query_logger(
            lambda record: seen.append(record.query) if record.query in EVENT_READS else None
        )

    monkeypatch.setattr(db_pool, "init_connection", logging_init)
    return seen


@pytest.fixture
async def pool(
    settings: Settings, dsn: str, db: asyncpg.Connection, reads: list[str]
) -> AsyncIterator[Any]:
    opened = await create_pool(settings, dsn)
    yield opened
    await opened.close()


async def numbered(db: asyncpg.Connection, workspace_id: str, count: int) -> list[int]:
    """Insert `count` events and number them (as the sequencer does); their numbers."""
    for _ in range(count):
        await insert_event(db, workspace_id)
    top = await events.sequence_pending(db)
    assert top is not None
    return list(range(top - count + 1, top + 1))


async def workspace(db: asyncpg.Connection) -> str:
    workspace_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO workspaces (id, name, token_hash) VALUES ($1, $2, $3)",
        workspace_id,
        f"w-{workspace_id}",  # names are unique among live workspaces
        uuid.uuid4().bytes,
    )
    return str(workspace_id)


async def new_feed(
    pool: asyncpg.Pool, db: asyncpg.Connection, queue_size: int = 100
) -> tuple[EventFeed, str, int]:
    """A feed that reads only when told (no poll, no notifications), a workspace for events,
    and the highest event number so far."""
    feed = EventFeed(pool, poll_s=3600, queue_size=queue_size, max_subscribers=10)
    return feed, await workspace(db), await events.last_sequence(db)


async def test_a_slow_subscriber_is_dropped_while_the_others_keep_up(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    feed, ws, now = await new_feed(pool, db, queue_size=3)
    fast, slow = feed.subscribe(now, now, None), feed.subscribe(now, now, None)
    got: list[bytes] = []

    for _ in range(5):  # one event at a time; the fast one takes each, the slow one none
        await numbered(db, ws, 1)
        await feed.read_new()
        got += await fast.take(0)

    assert sse_ids(got) == list(range(now + 1, now + 6))
    assert not fast.dropped
    assert slow.dropped and slow.last_id == now  # resumes after what it was given
    assert await slow.take(0) == []  # its queue was let go
    assert feed.dropped_total == 1


async def test_a_burst_larger_than_the_queue_does_not_drop_a_subscriber_that_keeps_up(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A sweep's thousand events in one commit: handed over page by page, never all at once."""
    feed, ws, now = await new_feed(pool, db, queue_size=3)
    sub = feed.subscribe(now, now, None)
    burst = await numbered(db, ws, 10)  # numbered together, read in pages of 3
    got: list[bytes] = []

    async def keep_up() -> None:
        while len(sse_ids(got)) < len(burst) and not sub.dropped:
            got.extend(await sub.take(5))

    async with asyncio.TaskGroup() as group:
        group.create_task(keep_up())
        await feed.read_new()

    assert not sub.dropped
    assert sse_ids(got) == burst


async def test_a_resume_hands_over_from_its_catch_up_to_the_feed_exactly_once(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    feed, ws, now = await new_feed(pool, db)
    live = feed.subscribe(now, now, None)
    first = await numbered(db, ws, 3)
    await feed.read_new()

    # A client resumes after the first of those; the feed has read up to the third.
    resumed = feed.subscribe(first[0], first[-1], None)
    # More events reach its queue before its own catch-up has read anything.
    more = await numbered(db, ws, 2)
    await feed.read_new()
    caught_up = await events.events_between(
        db, resumed.last_id, resumed.split, workspace_id=None, limit=500
    )
    queued = sse_ids(await resumed.take(0))

    assert [e.id for e in caught_up] + queued == first[1:] + more
    assert sse_ids(await live.take(0)) == first + more


async def test_a_subscriber_ahead_of_the_feed_gets_nothing_it_already_has(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    feed, ws, now = await new_feed(pool, db)
    feed.subscribe(now, now, None)
    unread = await numbered(db, ws, 2)  # numbered, not yet read by the feed

    # A client starting "from now" saw them in the database already.
    late = feed.subscribe(unread[-1], unread[-1], None)
    await feed.read_new()
    after = await numbered(db, ws, 1)
    await feed.read_new()

    assert late.split < late.last_id  # nothing to catch up: the feed is behind it
    assert sse_ids(await late.take(0)) == after


async def test_filters_are_applied_in_memory_from_the_one_read(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    feed, watched, now = await new_feed(pool, db)
    other = await workspace(db)
    mine = feed.subscribe(now, now, uuid.UUID(watched))
    everything = feed.subscribe(now, now, None)
    theirs = await numbered(db, other, 2)
    ours = await numbered(db, watched, 1)

    await feed.read_new()

    assert sse_ids(await mine.take(0)) == ours
    assert sse_ids(await everything.take(0)) == theirs + ours


async def test_a_feed_nobody_subscribes_to_reads_nothing(
    pool: asyncpg.Pool, db: asyncpg.Connection, reads: list[str]
) -> None:
    feed, ws, now = await new_feed(pool, db)
    sub = feed.subscribe(now, now, None)
    feed.unsubscribe(sub)
    await numbered(db, ws, 3)

    await feed.read_new()

    assert reads == []  # the last subscriber left: its position was let go
    again = await events.last_sequence(db)
    back = feed.subscribe(again, again, None)  # starts where the caller says "now" is
    assert back.split == again


# --- over HTTP, through the real app --------------------------------------------------------


@pytest.mark.parametrize("filtered", [False, True], ids=["all", "per-workspace"])
async def test_many_subscribers_share_one_reader(
    make_registry: MakeRegistry, reads: list[str], filtered: bool
) -> None:
    # No poll: the feed reads only when the sequencer says something was numbered.
    registry = await make_registry(event_poll_s=3600)
    watched = [await registry.create_workspace() for _ in range(5)]
    await all_numbered(registry)
    per_count: dict[int, int] = {}
    for count in (1, 20):
        streams = [
            await open_stream(
                registry, query=f"?workspace_id={watched[i % 5].id}" if filtered else ""
            )
            for i in range(count)
        ]
        reads.clear()
        for workspace in watched:
            await insert_event(registry.db, workspace.id)
        for i, stream in enumerate(streams):
            got = await read_events(stream, 1 if filtered else 5)
            if filtered:
                assert [e["workspace_id"] for e in got] == [watched[i % 5].id]
        per_count[count] = len(reads)
        for stream in streams:
            stream.close()

    # At most one read per notification, however many subscribers: never one each.
    assert per_count[20] <= len(watched), per_count
    assert per_count[1] <= len(watched), per_count


async def read_keepalives(response: ClientResponse, count: int, within_s: float = 10.0) -> None:
    seen = 0
    async with asyncio.timeout(within_s):
        while seen < count:
            if (await response.content.readline()).startswith(b": keepalive"):
                seen += 1


async def test_idle_subscribers_make_no_queries(
    make_registry: MakeRegistry, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle time is counted in keep-alives, which each subscriber sends when nothing came.
    monkeypatch.setattr(event_handlers, "KEEPALIVE_S", 0.1)
    # No poll either: the feed reads only when something was numbered, and nothing is.
    registry = await make_registry(event_poll_s=3600)
    await all_numbered(registry)
    streams = [await open_stream(registry) for _ in range(20)]
    reads.clear()

    for stream in streams:
        await read_keepalives(stream, 3)

    assert reads == []
    for stream in streams:
        stream.close()


async def test_subscribers_beyond_the_cap_get_503_with_retry_after(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(event_max_subscribers=2)
    streams = [await open_stream(registry) for _ in range(2)]

    refused = await registry.client.get("/events", headers=ADMIN)

    assert refused.status == 503
    assert refused.headers["Retry-After"].isdigit()
    assert (await refused.json())["error"]["code"] == "too_many_subscribers"
    for stream in streams:
        stream.close()


class RawStream:
    """An SSE client on a socket with a small receive buffer that reads only when told: a
    subscriber that stops reading fills its socket, and the registry's writer then waits."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, path: str, version: str = "1.1") -> RawStream:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        # A small limit: the stream reader stops taking from the socket at 2 x 1 KiB.
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        auth = ADMIN["Authorization"]
        writer.write(
            f"GET {path} HTTP/{version}\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        return cls(reader, writer)

    async def read_all(self, within_s: float = 20.0) -> bytes:
        chunks = []
        async with asyncio.timeout(within_s):
            while chunk := await self.reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each frame of a chunked SSE body."""
    body = b"".join(_dechunk(raw.split(b"\r\n\r\n", 1)[1]))
    found = []
    for block in body.split(b"\n\n"):
        fields = dict(
            line.split(b": ", 1)
            for line in block.split(b"\n")
            if b": " in line and line[:1] != b":"
        )
        if b"data" in fields:
            found.append((fields[b"event"].decode(), orjson.loads(fields[b"data"])))
    return found


def _dechunk(body: bytes) -> list[bytes]:
    parts = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        parts.append(rest[:size])
        body = rest[size + 2 :]
    return parts


@pytest.mark.parametrize(
    ("direct", "bound"),
    [(True, "events"), (True, "bytes"), (False, "events")],
    ids=["direct-events-behind", "direct-bytes-unsent", "writer-tasks"],
)
async def test_a_subscriber_that_stops_reading_is_told_and_resumes_exactly_once(
    make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch, direct: bool, bound: str
) -> None:
    """Dropped once it is 4 events behind, or (bytes) once its socket holds 200 KB unsent
    with room for 1,000 events: without the byte bound it is never dropped within the 400
    events this test writes."""
    if bound == "bytes":
        monkeypatch.setattr(event_feed, "MAX_UNSENT_BYTES", 200_000)
    registry = await make_registry(
        event_subscriber_queue=4 if bound == "events" else 1000, event_direct_writes=direct
    )
    workspace = await registry.create_workspace()
    await all_numbered(registry)
    server = registry.client.server
    keeping_up = await open_stream(registry)
    stalled = await RawStream.open(str(server.host), int(server.port or 0), "/events")
    feed = registry.client.app[EVENT_HUB].feed
    async with asyncio.timeout(5):
        while feed.subscribers < 2:
            await asyncio.sleep(0.01)
    sent: list[int] = []
    # Events big enough to fill the stalled socket within a bounded number of them.
    detail = {"padding": "x" * 32_000}
    for _ in range(40):  # 10 events a round, read by the one that keeps up
        for _ in range(10):
            await insert_event(registry.db, workspace.id, detail)
        sent += [event["id"] for event in await read_events(keeping_up, 10)]
        if feed.dropped_total:
            break
    assert feed.dropped_total == 1, "the stalled subscriber was never dropped"

    told = sse_events(await stalled.read_all())
    stalled.close()
    kinds = [kind for kind, _ in told]
    assert kinds[-1] == "dropped"
    assert all(kind == "reconcile" for kind in kinds[:-1])
    last = told[-1][1]["last_event_id"]
    assert told[-1][1]["reason"] == "slow_subscriber"
    assert [data["id"] for _, data in told[:-1]] == sent[: len(told) - 1]
    assert last == (told[-2][1]["id"] if len(told) > 1 else sent[0] - 1)

    # It comes back with Last-Event-ID and gets the rest, each once.
    resumed = await open_stream(registry, **{"Last-Event-ID": str(last)})
    rest = await read_events(resumed, len([i for i in sent if i > last]))
    resumed.close()
    keeping_up.close()
    assert [e["id"] for e in rest] == [i for i in sent if i > last]


async def test_a_live_subscriber_whose_client_left_is_let_go_at_the_next_page(
    make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its handler waits for no keep-alive to find out (none comes within the test) and is
    not cancelled (as under `serve`): the feed's write sees the socket closing and ends the
    stream (fails without that check)."""
    monkeypatch.setattr(event_handlers, "KEEPALIVE_S", 3600)
    registry = await make_registry()
    # As `serve` runs: aiohttp's test server cancels a handler whose client hung up.
    runner = registry.client.server.runner
    assert runner is not None and runner.server is not None
    runner.server.handler_cancellation = False
    workspace = await registry.create_workspace()
    await all_numbered(registry)
    feed = registry.client.app[EVENT_HUB].feed
    staying, leaving = await open_stream(registry), await open_stream(registry)
    await insert_event(registry.db, workspace.id)
    await read_events(leaving, 1)
    await read_events(staying, 1)
    leaving.close()

    await insert_event(registry.db, workspace.id)
    await read_events(staying, 1)
    async with asyncio.timeout(10):
        while feed.subscribers > 1:
            await asyncio.sleep(0.01)
    staying.close()


async def test_subscribers_of_everything_are_given_one_shared_page_of_frames(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A page is joined once for all who get the same events, not once per subscriber."""
    feed, ws, now = await new_feed(pool, db)
    subs = [feed.subscribe(now, now, None) for _ in range(3)]
    ids = await numbered(db, ws, 4)

    await feed.read_new()

    pages = [await sub.take(0) for sub in subs]
    assert all(sse_ids(p) == ids for p in pages)
    assert pages[1][0] is pages[0][0] and pages[2][0] is pages[0][0]


async def test_an_http_1_0_stream_is_written_unchunked(make_registry: MakeRegistry) -> None:
    """The feed frames its writes as aiohttp frames the response: no chunks for HTTP/1.0."""
    registry = await make_registry()
    workspace = await registry.create_workspace()
    await all_numbered(registry)
    server = registry.client.server
    stream = await RawStream.open(str(server.host), int(server.port or 0), "/events", "1.0")
    feed = registry.client.app[EVENT_HUB].feed
    async with asyncio.timeout(5):
        while feed.subscribers < 1:
            await asyncio.sleep(0.01)
    await insert_event(registry.db, workspace.id)
    await insert_event(registry.db, workspace.id)

    data = b""
    async with asyncio.timeout(10):
        while data.count(b"\nevent: reconcile\n") < 2:
            data += await stream.reader.read(65536)
    stream.close()
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower()
    assert b"\r\n" not in body
    assert [block.split(b"\n")[1] for block in body.split(b"\n\n")[1:3]] == [
        b"event: reconcile",
        b"event: reconcile",
    ]


async def test_a_paced_feed_gathers_what_comes_during_its_pause_into_one_page(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """REGISTRY_EVENT_WRITES_PER_S: a page written to 3 subscribers on a budget of 30 writes a
    second holds the next read back 0.1 s, and what is numbered meanwhile reaches each of them
    as one page, not one page per event. The pause is held by the test, so no clock decides."""
    requested: list[float] = []
    release = asyncio.Event()

    async def held(seconds: float) -> None:
        requested.append(seconds)
        await release.wait()
        release.clear()

    ws, now = await workspace(db), await events.last_sequence(db)
    feed = EventFeed(
        pool, poll_s=3600, queue_size=100, max_subscribers=10, writes_per_s=30, pause=held
    )
    subs = [feed.subscribe(now, now, None) for _ in range(3)]
    first = await numbered(db, ws, 1)
    reading = asyncio.create_task(feed.read_new())
    async with asyncio.timeout(10):
        while not requested:
            await asyncio.sleep(0.01)
    assert requested == [pytest.approx(0.1)]
    assert [sse_ids(await sub.take(0)) for sub in subs] == [first] * 3

    # While the feed waits out its pause, two events come, one by one.
    later = [*(await numbered(db, ws, 1)), *(await numbered(db, ws, 1))]
    assert [await sub.take(0) for sub in subs] == [[]] * 3
    release.set()
    await reading  # that page was short: this read is over
    reading = asyncio.create_task(feed.read_new())
    async with asyncio.timeout(10):
        while len(requested) < 2:
            await asyncio.sleep(0.01)

    pages = [await sub.take(0) for sub in subs]
    assert all(len(p) == 1 and sse_ids(p) == later for p in pages)
    release.set()
    await reading


async def test_an_unpaced_feed_reads_on_without_pausing(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async def never(seconds: float) -> None:
        raise AssertionError(f"paused {seconds} s")

    ws, now = await workspace(db), await events.last_sequence(db)
    feed = EventFeed(pool, poll_s=3600, queue_size=100, max_subscribers=10, pause=never)
    sub = feed.subscribe(now, now, None)
    ids = await numbered(db, ws, 2)
    await feed.read_new()
    assert sse_ids(await sub.take(0)) == ids
