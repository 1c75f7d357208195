"""One reader per process for the live event stream, fanning out to every subscriber.

The feed reads what the sequencer numbered (woken by NOTIFY, and every poll interval in case
a notification was lost), encodes each event's frame once and offers it to the bounded queue
of every subscriber whose filter matches. Subscribers never query while they wait: an idle
one costs a timer. One that lets its queue fill is dropped (and told), so a slow client holds
neither memory nor the others back; it resumes from the database with Last-Event-ID.

Exactly once across the hand-over: a subscriber joins at the feed's position `split` (the
highest number the feed has read). It reads what it missed, (after, split], from the database
itself, once; the feed gives it only events above max(after, split), in order. Numbers are
given in commit order (registry/db/events.py), so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable

import asyncpg

from registry.db import events
from registry.db.errors import DatabaseUnavailable
from registry.db.events import Event
from registry.errors import ServiceUnavailable
from registry.event_frames import frame

log = logging.getLogger(__name__)

# Events per read; the feed reads on until a page comes back short. Never more than a
# subscriber's queue holds: a burst is handed over page by page, and between two pages (while
# the feed waits for the database) every writer that keeps up empties its queue.
PAGE = 500
# Writers woken per turn of the event loop after a page (see EventFeed._wake_writers).
WAKE_SLICE = 25
# A client turned away at the subscriber cap retries after this long (Retry-After).
RETRY_AFTER_FULL_S = 5


class TooManySubscribers(ServiceUnavailable):
    code = "too_many_subscribers"
    retry_after_s = RETRY_AFTER_FULL_S


class Subscription:
    """One subscriber's queue of encoded frames, filled by the feed, drained by its writer."""

    __slots__ = (
        "_capacity",
        "_queue",
        "_ready",
        "closed",
        "dropped",
        "floor",
        "last_id",
        "on_drop",
        "split",
        "workspace_id",
    )

    def __init__(
        self, workspace_id: uuid.UUID | None, after: int, split: int, capacity: int
    ) -> None:
        self.workspace_id = workspace_id
        # The feed offers events above this; (after, split] is the subscriber's own catch-up.
        self.split = split
        self.floor = max(after, split)
        # The last event handed to the writer: where a dropped subscriber resumes.
        self.last_id = after
        self.dropped = False
        self.closed = False
        # Called once when dropped, e.g. to close a connection whose writer is stuck.
        self.on_drop: Callable[[], None] | None = None
        self._capacity = capacity
        self._queue: deque[tuple[int, bytes]] = deque()
        self._ready = asyncio.Event()

    def offer(self, seq: int, encoded: bytes) -> bool:
        """Queue a frame (the writer is woken by wake()); True when this one found the queue
        full and dropped the subscriber."""
        if self.dropped or self.closed:
            return False
        if len(self._queue) < self._capacity:
            self._queue.append((seq, encoded))
            return False
        self.dropped = True
        self._queue.clear()  # what it would have got next, it reads from the database
        if self.on_drop is not None:
            self.on_drop()
        return True

    def wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def caught_up_to(self, seq: int) -> None:
        """The writer sent the catch-up through `seq`."""
        self.last_id = max(self.last_id, seq)

    async def take(self, within_s: float) -> list[bytes]:
        """Every frame queued so far; [] when none came within `within_s`, or once dropped
        or closed (check those first)."""
        if not self._queue and not self.dropped and not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self._ready.wait()
        self._ready.clear()
        if self.dropped or self.closed or not self._queue:
            return []
        batch = list(self._queue)
        self._queue.clear()
        self.last_id = batch[-1][0]
        return [encoded for _, encoded in batch]


class EventFeed:
    """The process's one reader of workspace_events for its subscribers."""

    def __init__(
        self, pool: asyncpg.Pool, *, poll_s: float, queue_size: int, max_subscribers: int
    ) -> None:
        self._pool = pool
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
            offered: dict[Subscription, None] = {}  # in order, each once
            for event in page:
                self._fan_out(event, offered)
            # Before anything else runs: a subscriber joining now starts after this page.
            if page:
                self._position = page[-1].id
            await self._wake_writers(list(offered))
            if len(page) < self._page:
                return

    @staticmethod
    async def _wake_writers(subs: list[Subscription]) -> None:
        """Wake the writers a slice at a time, letting the loop poll its sockets between
        slices: heartbeats arriving meanwhile wait for one slice of writes, not for all."""
        for start in range(0, len(subs), WAKE_SLICE):
            if start:
                await asyncio.sleep(0)
            for sub in subs[start : start + WAKE_SLICE]:
                sub.wake()

    def _fan_out(self, event: Event, offered: dict[Subscription, None]) -> None:
        encoded: bytes | None = None
        watching = self._by_workspace.get(event.workspace_id) if event.workspace_id else None
        for group in (self._everyone, watching or ()):
            for sub in group:
                if event.id > sub.floor:
                    if encoded is None:
                        encoded = frame(event)  # once, for every subscriber
                    if sub.offer(event.id, encoded):
                        self.dropped_total += 1
                    offered[sub] = None
