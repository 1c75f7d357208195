"""One reader per process for the live event stream, fanning out to every subscriber.

The feed reads what the sequencer numbered (woken by NOTIFY, and every poll interval in case
a notification was lost), a page at a time. It encodes each event's frame once and joins a
page's frames once per distinct share (the whole page for every subscriber of everything, one
workspace's events for those watching it). A subscriber still catching up from the database
gets its share queued; a live one gets it written straight to its socket, in one pass over the
live subscribers with no task woken and no await per socket (transport.write does not block;
the loop is let go every WRITE_SLICE sockets so a heartbeat waits for one slice, not for all).
Subscribers never query while they wait: an idle one costs a timer.

Slow subscribers: what a live socket has not taken yet is its backlog. One whose backlog would
pass REGISTRY_EVENT_SUBSCRIBER_QUEUE events, or whose socket still holds MAX_UNSENT_BYTES, is
dropped: its last frame is `event: dropped` with the last event it was written, and nothing is
written after it, so it resumes from the database with Last-Event-ID and misses nothing. A
slow client holds neither memory nor the others back. (REGISTRY_EVENT_DIRECT_WRITES=false keeps
the previous path, one writer task per subscriber draining its queue, to compare the two.)

Exactly once across the hand-over: a subscriber joins at the feed's position `split` (the
highest number the feed has read). It reads what it missed, (after, split], from the database
itself, once; the feed gives it only events above max(after, split), in order. Numbers are
given in commit order (registry/db/events.py), so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg

from registry.db import events
from registry.db.errors import DatabaseUnavailable
from registry.db.events import Event
from registry.errors import ServiceUnavailable
from registry.event_frames import dropped_frame, frame

log = logging.getLogger(__name__)

# Events per read; the feed reads on until a page comes back short. Never more than a
# subscriber's queue holds: a burst is handed over page by page, and between two pages (while
# the feed waits for the database) every writer that keeps up empties its queue.
PAGE = 500
# Writers woken per turn of the event loop after a page (see EventFeed._wake_writers).
WAKE_SLICE = 25
# Live sockets written per turn of the event loop (see EventFeed._write_live): a heartbeat
# arriving meanwhile waits for one slice of non-blocking writes (~1 ms), not for all of them.
WRITE_SLICE = 50
# A live subscriber whose socket still holds more than this many bytes when the next page comes
# is dropped (and told), whatever its count of events: the transport keeps a copy of what it
# could not send yet, so this (plus one page) bounds the memory a stalled client holds.
MAX_UNSENT_BYTES = 1 << 20
# A client turned away at the subscriber cap retries after this long (Retry-After).
RETRY_AFTER_FULL_S = 5


class TooManySubscribers(ServiceUnavailable):
    code = "too_many_subscribers"
    retry_after_s = RETRY_AFTER_FULL_S


class Sink:
    """A live subscriber's socket: the feed writes whole frames to it, framed as the response
    is (HTTP/1.1 chunks, or the raw body for HTTP/1.0)."""

    __slots__ = ("chunked", "transport")

    def __init__(self, transport: asyncio.WriteTransport, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked

    def wire(self, body: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body


class Subscription:
    """One subscriber. While it catches up from the database, the feed queues its frames
    (bounded; `take` empties the queue). Once live (`go_live`), the feed writes them straight
    to its socket; what the socket has not taken yet is its backlog, bounded the same way."""

    __slots__ = (
        "_backlog",
        "_capacity",
        "_ended",
        "_queue",
        "_queued",
        "_ready",
        "_sink",
        "_unsent",
        "_written",
        "closed",
        "dropped",
        "floor",
        "last_id",
        "on_drop",
        "split",
        "workspace_id",
        "wrote",
    )

    def __init__(
        self, workspace_id: uuid.UUID | None, after: int, split: int, capacity: int
    ) -> None:
        self.workspace_id = workspace_id
        # The feed offers events above this; (after, split] is the subscriber's own catch-up.
        self.split = split
        self.floor = max(after, split)
        # The last event handed to the writer (or, live, to the socket): where a dropped
        # subscriber resumes.
        self.last_id = after
        self.dropped = False
        self.closed = False
        # Called once when dropped, e.g. to close a connection whose writer is stuck.
        self.on_drop: Callable[[], None] | None = None
        self._capacity = capacity
        # Pages queued while not live: (last event id, frames, how many events).
        self._queue: deque[tuple[int, bytes, int]] = deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()
        # Live: the socket, bytes written to it in all, and the writes it may still hold
        # ((bytes written through the end of that write, its events)), `_backlog` events.
        self._sink: Sink | None = None
        self._written = 0
        self._unsent: deque[tuple[int, int]] = deque()
        self._backlog = 0
        self.wrote = False  # a frame went out since the last keep-alive check

    @property
    def sink(self) -> Sink | None:
        return self._sink

    @property
    def live(self) -> bool:
        return self._sink is not None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def offer(self, last_seq: int, frames: bytes, count: int) -> bool:
        """Queue a page's frames for this subscriber (the writer is woken by wake()); True
        when they found the queue full and dropped the subscriber."""
        if self.dropped or self.closed:
            return False
        if self._queued + count <= self._capacity:
            self._queue.append((last_seq, frames, count))
            self._queued += count
            return False
        self.dropped = True
        self._queue.clear()  # what it would have got next, it reads from the database
        self._queued = 0
        self._dropped_now()
        return True

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._ended.set()

    def caught_up_to(self, seq: int) -> None:
        """The writer sent the catch-up through `seq`."""
        self.last_id = max(self.last_id, seq)

    async def take(self, within_s: float) -> list[bytes]:
        """Every page of frames queued so far; [] when none came within `within_s`, or once
        dropped or closed (check those first)."""
        if not self._queue and not self.dropped and not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self._ready.wait()
        self._ready.clear()
        if self.dropped or self.closed or not self._queue:
            return []
        batch = list(self._queue)
        self._queue.clear()
        self._queued = 0
        self.last_id = batch[-1][0]
        return [frames for _, frames, _ in batch]

    # --- live: the feed writes to the socket -------------------------------------------------

    def go_live(self, sink: Sink) -> None:
        """From now on the feed writes this subscriber's frames to `sink`; what it queued
        during the catch-up goes first, in the same turn of the loop (nothing in between)."""
        if self.dropped or self.closed:
            return
        queued = list(self._queue)
        self._queue.clear()
        self._queued = 0
        self._sink = sink
        if queued:
            frames = b"".join(page for _, page, _ in queued)
            self.deliver(queued[-1][0], sink.wire(frames), sum(n for _, _, n in queued))

    def deliver(self, last_seq: int, wire: bytes, count: int) -> bool:
        """Write a page (already framed for the wire) to the live socket, without waiting;
        True when the subscriber's backlog would pass its bounds and it was dropped instead:
        it is told (`event: dropped`, the last event it was written) and written nothing more."""
        sink = self._sink
        if sink is None or self.closed or self.dropped:
            return False
        transport = sink.transport
        if transport.is_closing():
            self.close()  # the client went away; its handler ends the stream
            return False
        # A page of its own never drops a subscriber whose socket took everything before it.
        unsent_bytes = self._settle(transport)
        if self._backlog + count > self._capacity or unsent_bytes > MAX_UNSENT_BYTES:
            self.dropped = True
            transport.write(sink.wire(dropped_frame(self.last_id)))
            self._dropped_now()
            return True
        transport.write(wire)
        self._written += len(wire)
        self.last_id = last_seq
        self.wrote = True
        if transport.get_write_buffer_size():
            self._unsent.append((self._written, count))
            self._backlog += count
        return False

    def keepalive(self, frame: bytes) -> None:
        """Live and idle since the last call: a comment line, so proxies keep the stream."""
        sink = self._sink
        if sink is None or self.ended:
            return
        if sink.transport.is_closing():
            self.close()
        elif not self.wrote:
            sink.transport.write(sink.wire(frame))
        self.wrote = False

    async def wait_ended(self, within_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._ended.wait()
        return self._ended.is_set()

    def _settle(self, transport: asyncio.WriteTransport) -> int:
        """Forget the writes the socket has taken since; the bytes it still holds."""
        unsent_bytes = transport.get_write_buffer_size()
        taken_through = self._written - unsent_bytes
        while self._unsent and self._unsent[0][0] <= taken_through:
            self._backlog -= self._unsent.popleft()[1]
        return unsent_bytes

    def _dropped_now(self) -> None:
        self._ready.set()
        self._ended.set()
        if self.on_drop is not None:
            self.on_drop()


class EventFeed:
    """The process's one reader of workspace_events for its subscribers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        poll_s: float,
        queue_size: int,
        max_subscribers: int,
        writes_per_s: float = 0.0,
        on_events: Callable[[], None] | None = None,
        pause: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        # The fan-out's budget of subscriber writes a second (0: none). After a page written
        # to N subscribers the feed reads the next no sooner than N / budget seconds later, so
        # events meanwhile join one page: as many writes a second whatever the number of
        # subscribers, each later by up to that pause (docs/benchmarks.md, the event stream).
        self._writes_per_s = writes_per_s
        # How the feed waits out a pause (the tests hold it to see what a pause gathers).
        self._pause = self._stoppable_sleep if pause is None else pause
        # Called when a page of events was read, before it is delivered (GET /fleet's shared
        # count is dropped then: registry/fleet_statuses.py).
        self._on_events = on_events
        self._poll_s = poll_s
        self._queue_size = queue_size
        self._page = min(PAGE, queue_size)
        self._max_subscribers = max_subscribers
        # None while nobody subscribes: the feed then reads nothing, and the first subscriber
        # sets it. Bumped generation: a read in flight when it was forgotten is discarded.
        self._position: int | None = None
        self._generation = 0
        self._everyone: set[Subscription] = set()
        self._by_workspace: dict[uuid.UUID, set[Subscription]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.dropped_total = 0

    @property
    def subscribers(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self._max_subscribers

    def check_room(self) -> None:
        if self.full:
            raise TooManySubscribers(
                f"this process already streams to {self._max_subscribers} subscribers; "
                "retry later or through another process"
            )

    def subscribe(self, after: int, now: int, workspace_id: uuid.UUID | None) -> Subscription:
        """Join after event `after`; `now` is the highest number the caller just read from
        the database, where the feed starts if nobody was subscribed."""
        self.check_room()
        if self._stop.is_set():
            raise ServiceUnavailable("the registry is shutting down", code="shutting_down")
        if self._position is None:
            self._position = now
        sub = Subscription(workspace_id, after, self._position, self._queue_size)
        if workspace_id is None:
            self._everyone.add(sub)
        else:
            self._by_workspace.setdefault(workspace_id, set()).add(sub)
        self._count += 1
        if now > self._position:
            self._wake.set()  # the feed is behind what the caller saw: read now
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.workspace_id is None:
            found = sub in self._everyone
            self._everyone.discard(sub)
        else:
            group = self._by_workspace.get(sub.workspace_id, set())
            found = sub in group
            group.discard(sub)
            if not group:
                self._by_workspace.pop(sub.workspace_id, None)
        if not found:
            return
        sub.close()  # its stream has ended: the feed writes it nothing more
        self._count -= 1
        if self._count == 0:
            self._position = None
            self._generation += 1

    def wake(self) -> None:
        """Something new was numbered (a notification)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for sub in [*self._everyone, *(s for g in self._by_workspace.values() for s in g)]:
            sub.close()

    async def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await self.read_new()
            except DatabaseUnavailable as exc:
                log.warning("event feed: database unavailable: %s", exc)
            except Exception:
                log.exception("event feed failed")

    async def read_new(self) -> None:
        """Read and fan out everything numbered after the position, page by page."""
        while (position := self._position) is not None:
            generation = self._generation
            async with self._pool.acquire() as conn:
                page = await events.events_after(
                    conn, position, workspace_id=None, limit=self._page
                )
            if generation != self._generation:
                continue  # everyone left meanwhile and the position was forgotten
            if page:
                # Before anything else runs: a subscriber joining now starts after this page.
                self._position = page[-1].id
                if self._on_events is not None:
                    self._on_events()
                queued, live = self._fan_out(page)
                await self._write_live(live)
                await self._wake_writers(queued)
                await self._pace(len(queued) + len(live))
            if len(page) < self._page:
                return

    async def _pace(self, writes: int) -> None:
        """Hold the next read back by the time `writes` take of the budget."""
        if self._writes_per_s > 0 and writes:
            await self._pause(writes / self._writes_per_s)

    async def _stoppable_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    @staticmethod
    async def _wake_writers(subs: list[Subscription]) -> None:
        """Wake the writers a slice at a time, letting the loop poll its sockets between
        slices: heartbeats arriving meanwhile wait for one slice of writes, not for all."""
        for start in range(0, len(subs), WAKE_SLICE):
            if start:
                await asyncio.sleep(0)
            for sub in subs[start : start + WAKE_SLICE]:
                sub.wake()

    async def _write_live(self, live: list[tuple[Subscription, int, bytes, int]]) -> None:
        """One pass over the live subscribers, no await per socket: each page is framed for
        the wire once (per distinct set of frames) and the same bytes go to every socket."""
        wires: dict[tuple[int, bool], bytes] = {}
        for i, (sub, last_seq, frames, count) in enumerate(live):
            if i and not i % WRITE_SLICE:
                await asyncio.sleep(0)
            sink = sub.sink
            if sink is None:
                continue
            key = (id(frames), sink.chunked)
            if (wire := wires.get(key)) is None:
                wire = wires[key] = sink.wire(frames)
            if sub.deliver(last_seq, wire, count):
                self.dropped_total += 1

    def _fan_out(
        self, page: list[Event]
    ) -> tuple[list[Subscription], list[tuple[Subscription, int, bytes, int]]]:
        """Each matching subscriber's share of the page, joined once per distinct share (the
        whole page for every subscriber of everything, one workspace's events for those
        watching it). Subscribers still catching up get it queued now; the live ones are
        returned with it, to be written."""
        ids = [event.id for event in page]
        encoded: dict[int, bytes] = {}  # each event's frame, encoded once
        shares: dict[tuple[uuid.UUID | None, int], tuple[int, bytes, int]] = {}
        queued: list[Subscription] = []
        live: list[tuple[Subscription, int, bytes, int]] = []

        def share(key: uuid.UUID | None, picks: list[int], start: int) -> tuple[int, bytes, int]:
            found = shares.get((key, start))
            if found is None:
                chosen = picks[start:]
                for i in chosen:
                    if i not in encoded:
                        encoded[i] = frame(page[i])
                joined = b"".join(encoded[i] for i in chosen)
                found = shares[(key, start)] = (ids[chosen[-1]], joined, len(chosen))
            return found

        everything = list(range(len(page)))
        groups: list[tuple[uuid.UUID | None, list[int], set[Subscription]]] = [
            (None, everything, self._everyone)
        ]
        if self._by_workspace:
            by_workspace: dict[uuid.UUID, list[int]] = {}
            for i, event in enumerate(page):
                if event.workspace_id in self._by_workspace:
                    by_workspace.setdefault(event.workspace_id, []).append(i)
            for workspace_id, picks in by_workspace.items():
                groups.append((workspace_id, picks, self._by_workspace[workspace_id]))
        for key, picks, subs in groups:
            first, last = ids[picks[0]], ids[picks[-1]]
            for sub in subs:
                if sub.floor >= last:
                    continue
                start = 0 if sub.floor < first else self._first_above(ids, picks, sub.floor)
                last_seq, frames, count = share(key, picks, start)
                if sub.live:
                    live.append((sub, last_seq, frames, count))
                else:
                    if sub.offer(last_seq, frames, count):
                        self.dropped_total += 1
                    queued.append(sub)
        return queued, live

    @staticmethod
    def _first_above(ids: list[int], picks: list[int], floor: int) -> int:
        """The index in `picks` of the first event numbered above `floor`."""
        return bisect.bisect_right(picks, floor, key=lambda i: ids[i])
