"""A figure read from the database once for every caller of this process, however many ask.

Fleet-wide figures (the counts of GET /fleet, the minutes of GET /fleet/history) cost the
database a scan that grows with the fleet, and dashboards poll them: one read serves every
caller for `ttl_s`, and callers that arrive while a read runs wait for it and share it.

With `stale_s` above `ttl_s`, a value past its ttl but younger than `stale_s` is answered at
once while one read refreshes it in the background: no caller waits for the scan once the
first read is done, and a polled figure is never older than its ttl plus one read. A read that
fails leaves the last value in place (and, in the background, is retried by the next caller);
a caller that has to wait (no value yet, or one older than `stale_s`) gets the error.

A caller may ask for a longer ttl than the figure's own (`get(min_ttl_s=…)`): a page that can
live with an older figure than a scraper wants shares the scraper's reads and adds none.

`invalidate()` says the figure changed (e.g. the process's event feed read an event): a value
read before it is no longer answered, and the next caller waits for a new read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedRead(Generic[T]):
    def __init__(
        self,
        read: Callable[[], Awaitable[T]],
        ttl_s: float,
        stale_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._stale_s = ttl_s if stale_s is None else max(stale_s, ttl_s)
        self._clock = clock
        # (when the read started, what it read)
        self._entry: tuple[float, T] | None = None
        # Values read before this moment are not answered (invalidate()).
        self._valid_from = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    def invalidate(self) -> None:
        self._valid_from = self._clock()

    def _kept(self) -> tuple[float, T] | None:
        entry = self._entry
        return entry if entry is not None and entry[0] >= self._valid_from else None

    async def get(self, min_ttl_s: float = 0.0) -> T:
        ttl_s = max(self._ttl_s, min_ttl_s)
        if (entry := self._kept()) is not None:
            age = self._clock() - entry[0]
            if age < ttl_s:
                return entry[1]
            if age < self._stale_s:
                if self._background is None and not self._lock.locked():
                    self._background = asyncio.create_task(self._refresh_in_background())
                return entry[1]
        return await self._refresh(ttl_s)

    async def _refresh(self, ttl_s: float | None = None) -> T:
        ttl_s = self._ttl_s if ttl_s is None else ttl_s
        asked_at = self._clock()
        async with self._lock:
            # What a read finished while this caller waited is fresh enough if it is within
            # the ttl, or if that read started after this caller asked (ttl 0: exact).
            if (entry := self._kept()) is not None and (
                self._clock() - entry[0] < ttl_s or entry[0] >= asked_at
            ):
                return entry[1]
            read_at = self._clock()
            value = await self._read()
            self._entry = (read_at, value)
            return value

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh()
        except Exception:
            # The last value stays; the next caller past the ttl tries again.
            log.warning("background read failed; serving the last value", exc_info=True)
        finally:
            self._background = None

    async def close(self) -> None:
        """Cancel a background read (at shutdown, before the pool it uses closes)."""
        if (task := self._background) is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
