"""Shared ref resolutions: one `git ls-remote` per source answers every run that asked before it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from registry.plugins.fetch import Pinned
from registry.plugins.single_flight import SingleFlight

__all__ = ["Resolutions"]


@dataclass(frozen=True, slots=True)
class _Resolved:
    pinned: Pinned
    # A time at or before which the resolution started (in the database's clock).
    started_at: datetime


def _fresh_enough(started_at: datetime, requested_at: datetime | None) -> bool:
    return requested_at is not None and started_at >= requested_at


class Resolutions:
    """Which commit a source's ref points at, shared between the runs of a fan-out.

    A run asks "what does the ref point at now?" on behalf of a request made at
    ``requested_at``. Any resolution that started after that request answers the question as
    well as a new one would: the ref as it was after the request. So a fan-out to 200
    workspaces, all requested in one statement, needs one resolution per source: the first
    run resolves, runs in flight meanwhile wait for it (single flight), and later runs reuse
    its answer. A request made after a resolution started (the next plugin update) never
    gets it: it resolves again. Times are the database's (the request's commit time and the
    time the resolving run was claimed, which precedes its ls-remote), so no host clock has
    to agree with another.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._done: OrderedDict[str, _Resolved] = OrderedDict()
        self._flights: SingleFlight[str, Pinned, datetime] = SingleFlight()

    async def resolve(
        self,
        key: str,
        resolve: Callable[[], Awaitable[Pinned]],
        *,
        requested_at: datetime | None,
        started_at: datetime,
    ) -> Pinned:
        """The resolution of ``key``, made after ``requested_at`` (None: a new one)."""
        done = self._done.get(key)
        if done is not None and _fresh_enough(done.started_at, requested_at):
            self._done.move_to_end(key)
            return done.pinned

        async def work() -> Pinned:
            pinned = await resolve()
            self._remember(key, _Resolved(pinned, started_at))
            return pinned

        return await self._flights.run(
            key,
            work,
            tag=started_at,
            joins=lambda flight_started: _fresh_enough(flight_started, requested_at),
        )

    def waiting(self, key: str) -> int:
        """How many runs wait for the resolution of ``key`` in progress."""
        return self._flights.followers(key)

    def forget(self, key: str, pinned: Pinned) -> None:
        """Drop a resolution found wrong (the ref moved before its commit was fetched)."""
        done = self._done.get(key)
        if done is not None and done.pinned == pinned:
            del self._done[key]

    def _remember(self, key: str, resolved: _Resolved) -> None:
        current = self._done.get(key)
        # Two flights can overlap (a later request started its own): keep the later answer.
        if current is None or current.started_at <= resolved.started_at:
            self._done[key] = resolved
            self._done.move_to_end(key)
        while len(self._done) > self._max_entries:
            self._done.popitem(last=False)
