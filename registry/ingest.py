"""Heartbeat ingestion: concurrent beats coalesced into one statement per batch.

One statement per request caps a registry at what one Python core can drive in round trips
(PERFORMANCE.md: ~6.7k/s); one statement per batch of concurrent beats costs the database a
fifth of the CPU per beat and lets the HTTP layer be the limit. There is no batching window:
a beat arriving while no batch is in flight is sent on the next loop tick (a lone beat waits
for nobody), and beats arriving while batches are in flight are sent as soon as one returns.

The work is done by the request tasks themselves: the beat that finds a free slot leads, sends
everything pending, and on return hands the slot to the oldest beat still waiting. No task is
created per batch and nothing outlives the requests it serves.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from registry.db.errors import DatabaseUnavailable
from registry.db.heartbeats import DEFAULT_POLICY, Beat, BeatPolicy, BeatResult, apply_beats
from registry.metrics import Metrics

log = logging.getLogger(__name__)


class _Lead:
    """Told to a waiting beat: a slot is free, send the pending batch yourself."""


LEAD = _Lead()


@dataclass(eq=False, slots=True)
class _Pending:
    beat: Beat
    future: asyncio.Future[BeatResult | _Lead] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class HeartbeatIngest:
    """Applies beats, coalesced (the default) or one statement per beat (for comparison)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        coalesce: bool,
        max_batch: int,
        max_in_flight: int,
        policy: BeatPolicy = DEFAULT_POLICY,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._coalesce = coalesce
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._policy = policy
        self._pending: list[_Pending] = []
        self._in_flight = 0
        # Batches refused because the database was unreachable: the liveness sweeper reads
        # it, since every beat of those was refused and their silence is the registry's doing.
        self.unreachable_batches = 0

    async def apply(self, beat: Beat) -> BeatResult:
        if not self._coalesce:
            return (await self._execute([beat]))[0]
        pending = _Pending(beat)
        self._pending.append(pending)
        leading = self._in_flight < self._max_in_flight
        if leading:
            self._in_flight += 1
        # A request can be cancelled at any await below (a client that hangs up, with aiohttp's
        # handler cancellation on; a timeout around the call). Whatever the point, a slot this
        # beat holds goes back, and nothing is handed to it afterwards.
        try:
            while True:
                if leading:
                    await self._lead(pending)  # gives the slot back itself, whatever happens
                result = await pending.future
                if not isinstance(result, _Lead):
                    return result
                pending.future = asyncio.get_running_loop().create_future()
                leading = True
        except BaseException:
            # Told to lead, then cancelled before it resumed: it never led, and the slot it
            # was handed is still counted as taken. Hand it to the next beat in line.
            told_to_lead = (
                pending.future.done()
                and not pending.future.cancelled()
                and pending.future.exception() is None
                and isinstance(pending.future.result(), _Lead)
            )
            self._forget(pending)
            if told_to_lead:
                self._in_flight -= 1
                self._pass_slot()
            raise

    async def _lead(self, own: _Pending) -> None:
        """Send one batch of what is pending (this slot is ours), then pass the slot on."""
        try:
            # Let the beats that arrived in this same loop tick join the batch.
            await asyncio.sleep(0)
            batch = self._take_batch()
            if batch:
                try:
                    await self._send(batch)
                except BaseException:
                    # Interrupted (cancelled) while sending: every beat of the batch still
                    # gets an answer, also those `_send` had not reached yet.
                    _fail(batch, DatabaseUnavailable("heartbeat batch interrupted"))
                    raise
        except BaseException:
            # This beat goes away: the slot must not be passed back to it below.
            self._forget(own)
            raise
        finally:
            self._in_flight -= 1
            self._pass_slot()

    def _forget(self, pending: _Pending) -> None:
        """A beat whose request went away: no batch or slot is handed to it any more."""
        pending.future.cancel()  # a no-op when it already holds an answer
        if pending in self._pending:
            self._pending.remove(pending)

    def _take_batch(self) -> list[_Pending]:
        # One beat per workspace per batch: a second beat for the same workspace must see
        # the first one's effect (its previous status), so it waits for the next batch.
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        seen: set[object] = set()
        for pending in self._pending:
            if pending.future.cancelled():
                continue  # its request went away; nobody waits for this beat
            if pending.future.done():
                rest.append(pending)  # told to lead; it sends itself when it resumes
                continue
            if len(batch) < self._max_batch and pending.beat.workspace_id not in seen:
                seen.add(pending.beat.workspace_id)
                batch.append(pending)
            else:
                rest.append(pending)
        self._pending = rest
        return batch

    def _pass_slot(self) -> None:
        for pending in self._pending:
            if self._in_flight >= self._max_in_flight:
                return
            if not pending.future.done():
                self._in_flight += 1
                pending.future.set_result(LEAD)

    async def _send(self, batch: list[_Pending]) -> None:
        """Answer every beat of the batch: a result or an exception, never nothing."""
        try:
            results = await self._execute([p.beat for p in batch])
        except DatabaseUnavailable as exc:
            self.unreachable_batches += 1
            # Every beat gets the same 503. This pool skips asyncpg's reset, which would
            # otherwise find a connection the outage broke (db/pool.py): replace them all.
            await self._pool.expire_connections()
            _fail(batch, exc)
            return
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # One bad beat must not fail the others: retry them one by one.
            log.warning("heartbeat batch of %d failed (%r); retrying one by one", len(batch), exc)
            for pending in batch:
                await self._send([pending])
            return
        except Exception as exc:
            # Not the database's doing (a bug): each beat gets its 500, the pool stays.
            _fail(batch, exc)
            return
        # Cancelled mid-statement: `_lead` answers every beat of its batch (this one's too).
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def _execute(self, beats: list[Beat]) -> list[BeatResult]:
        self._metrics.heartbeat_batch_size.observe(len(beats))
        async with self._pool.acquire() as conn:
            return await apply_beats(conn, beats, self._policy)


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
