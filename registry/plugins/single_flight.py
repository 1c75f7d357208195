"""Single-flight: concurrent callers asking for the same key share one execution."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class _LeaderCancelled(Exception):
    """The caller doing the work was cancelled: its followers start over, one of them leads."""


@dataclass(slots=True)
class _Flight(Generic[V, T]):
    future: asyncio.Future[V]
    tag: T
    followers: int = 0


class SingleFlight(Generic[K, V, T]):
    """At most one execution per key at a time; callers arriving meanwhile await its result.

    The first caller (the leader) runs the work itself, in its own task, so no orphaned
    background task outlives the callers: if the leader is cancelled, the work stops with it
    and each follower retries (one becomes the new leader) rather than inheriting the
    cancellation. A failure of the work is every waiting caller's failure.

    ``tag`` describes a flight (e.g. when it started); a caller joins a flight in progress
    only if ``joins(tag)`` says its result will do, and otherwise leads a new one, which from
    then on is the flight later callers see.
    """

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V, T]] = {}

    def followers(self, key: K) -> int:
        """How many callers wait for the flight of ``key`` in progress (0: none in progress)."""
        flight = self._flights.get(key)
        return 0 if flight is None else flight.followers

    async def run(
        self,
        key: K,
        work: Callable[[], Awaitable[V]],
        *,
        tag: T,
        joins: Callable[[T], bool] = lambda _tag: True,
    ) -> V:
        while (flight := self._flights.get(key)) is not None and joins(flight.tag):
            flight.followers += 1
            try:
                # The shield keeps a follower's cancellation from cancelling the shared future.
                return await asyncio.shield(flight.future)
            except _LeaderCancelled:
                continue
            finally:
                flight.followers -= 1
        mine: _Flight[V, T] = _Flight(asyncio.get_running_loop().create_future(), tag)
        self._flights[key] = mine
        try:
            value = await work()
        except asyncio.CancelledError:
            mine.future.set_exception(_LeaderCancelled())
            raise
        except BaseException as exc:
            mine.future.set_exception(exc)
            raise
        else:
            mine.future.set_result(value)
            return value
        finally:
            if mine.future.done() and not mine.future.cancelled():
                # Marks the exception retrieved: a flight nobody followed must not be
                # reported as "exception never retrieved".
                mine.future.exception()
            if self._flights.get(key) is mine:
                del self._flights[key]
