"""The live event stream: numbering committed events, and waking this process's feed.

Events are written by whatever transaction made the change. A sequencer (one process at a
time) numbers committed ones and NOTIFYs; every process LISTENs on a dedicated connection and
wakes its one feed (registry/event_feed.py), which reads what is new from the table and fans
it out to the Server-Sent-Events subscribers. A lost notification only delays the feed until
its next poll; nothing is skipped, because the feed reads by sequence number, never from the
notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from registry.db import events
from registry.db.errors import DatabaseUnavailable, database_calls
from registry.event_feed import EventFeed

log = logging.getLogger(__name__)

# How often pending events are numbered: the stream's added latency, at one cheap statement.
SEQUENCE_INTERVAL_S = 0.1
RECONNECT_DELAY_S = 1.0


class EventHub:
    """Numbers events and tells the local feed when there is something new."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, feed: EventFeed) -> None:
        self._pool = pool
        self._dsn = dsn
        self.feed = feed
        self._stop = asyncio.Event()

    @property
    def subscribers(self) -> int:
        return self.feed.subscribers

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self.feed.stop()

    def _on_notification(self, *_: Any) -> None:
        # asyncpg calls this on the event loop: a flag for the feed, nothing more.
        self.feed.wake()

    async def run_sequencer(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    await events.sequence_pending(conn)
            except DatabaseUnavailable as exc:
                log.warning("event sequencer: database unavailable: %s", exc)
            except Exception:
                log.exception("event sequencer failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SEQUENCE_INTERVAL_S)

    async def run_listener(self) -> None:
        """Hold a LISTEN connection (reconnecting as needed) and fan notifications out."""
        while not self._stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                # A connection of its own, not the pool's: classified here.
                with database_calls(checkout=True):
                    conn = await asyncpg.connect(self._dsn)
                    await conn.add_listener(events.EVENTS_CHANNEL, self._on_notification)
                # Anything that happened while we were not listening.
                self.feed.wake()
                while not self._stop.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), RECONNECT_DELAY_S)
            except DatabaseUnavailable as exc:
                log.warning("event listener: database unavailable: %s", exc)
            except Exception:
                log.exception("event listener failed")
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RECONNECT_DELAY_S)
