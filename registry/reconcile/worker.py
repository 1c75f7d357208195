"""Picks up due reconciles (durable intents) and runs them as jobs, a bounded number at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import aiojobs
import asyncpg

from registry.db import reconciles
from registry.db.errors import DatabaseUnavailable
from registry.db.reconciles import Claim
from registry.reconcile.runner import Reconciler

log = logging.getLogger(__name__)

# The hand-back at shutdown is one short statement per held run; bounded all the same.
HAND_BACK_S = 5.0


def new_owner_id() -> str:
    """Names this process in leases: unique per start, readable in the table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ReconcileWorker:
    """Claims due runs from the database and runs each as an aiojobs job.

    The database is the queue: a heartbeat commits the intent, then wakes this loop so the run
    starts at once; the poll is the safety net that finds intents from other processes,
    retries that came due and runs whose owner died. The loop also renews the leases of the
    runs it holds, so that only a dead process's runs are taken over.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        scheduler: aiojobs.Scheduler,
        reconciler: Reconciler,
        *,
        owner: str,
        concurrency: int,
        poll_s: float,
        lease_s: float,
    ) -> None:
        self._pool = pool
        self._scheduler = scheduler
        self._reconciler = reconciler
        self.owner = owner
        self._concurrency = concurrency
        self._poll_s = min(poll_s, lease_s / 3)
        self._lease_s = lease_s
        self._wakeup = asyncio.Event()
        # The runs this process executes, by id; each lease renewed at every poll.
        self._jobs: dict[uuid.UUID, aiojobs.Job[None]] = {}
        self._leases_renewed_at = time.monotonic()
        self._stopping = False

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wakeup.set()

    @property
    def running(self) -> frozenset[uuid.UUID]:
        return frozenset(self._jobs)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def run_forever(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self._tick()
            except DatabaseUnavailable as exc:
                log.warning("reconcile worker: database unavailable: %s", exc)
                await self._fence_if_leases_lapsed()
            except Exception:
                log.exception("reconcile worker: poll failed")
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)

    async def _tick(self) -> None:
        if self._jobs:
            await self._renew()
        if not self._jobs:
            # Nothing held: the leases of what this tick claims start now.
            self._leases_renewed_at = time.monotonic()
        async with self._pool.acquire() as conn:
            free = self._concurrency - len(self._jobs)
            claims = (
                await reconciles.claim_due(
                    conn,
                    self.owner,
                    self._lease_s,
                    free,
                    list(self._jobs),
                    self._reconciler.max_attempts,
                )
                if free > 0
                else []
            )
        for claim in claims:
            run = self._run(claim)
            try:
                self._jobs[claim.id] = await self._scheduler.spawn(
                    run, name=f"reconcile-{claim.id}"
                )
            except BaseException:
                # Not started: the claim's lease lapses and another poll takes the run over.
                run.close()
                raise

    async def _renew(self) -> None:
        """Renew the leases of the runs held here, within what is left of them: a renewal that
        stalls (a hung connection, a lock, an exhausted pool) must not outlast the leases, or
        this process would run on while another takes its runs over."""
        started = time.monotonic()
        left = self._leases_renewed_at + self._lease_s - started
        try:
            async with asyncio.timeout(max(left, 0.0)):
                async with self._pool.acquire() as conn:
                    leases = await reconciles.renew_leases(
                        conn, self.owner, self._lease_s, list(self._jobs)
                    )
        except TimeoutError:
            if time.monotonic() < self._leases_renewed_at + self._lease_s:
                raise  # the pool's or the query's own timeout, within the leases
            await self._stop_runs(set(self._jobs), "its lease could not be renewed in time")
            return
        self._leases_renewed_at = started
        # A run neither renewed nor taken has just written its own outcome: not a loss.
        await self._stop_runs(leases.taken & set(self._jobs), "its lease was taken over")

    async def _fence_if_leases_lapsed(self) -> None:
        """Unable to renew for a whole lease, this process must assume others took its runs
        over: stop them, so that no workspace ever gets two reconciles at once."""
        if time.monotonic() - self._leases_renewed_at >= self._lease_s:
            await self._stop_runs(set(self._jobs), "its lease could not be renewed")

    async def _stop_runs(self, ids: set[uuid.UUID], why: str) -> None:
        for reconcile_id in ids:
            job = self._jobs.pop(reconcile_id, None)
            if job is not None:
                log.warning("reconcile stopped: %s", why, extra={"reconcile_id": str(reconcile_id)})
                await job.close()

    async def hand_back(self) -> None:
        """Once the scheduler has closed: give back every run still held here.

        aiojobs' close() cancels shielded jobs too, so a run cancelled while it wrote its
        outcome (or handed itself back) may have written nothing and would stay `running`
        under the lease of a process that is gone. This short write, outside any job, makes
        every such run queued again (DESIGN lesson 8); if it cannot, the leases lapse and
        another process takes the runs over.
        """
        try:
            async with asyncio.timeout(HAND_BACK_S), self._pool.acquire() as conn:
                count = await reconciles.release_all(conn, self.owner)
        except (DatabaseUnavailable, TimeoutError) as exc:
            log.warning("reconciles not handed back (their leases will lapse): %r", exc)
            return
        if count:
            log.info("handed %d reconcile(s) back at shutdown", count)

    async def _run(self, claim: Claim) -> None:
        try:
            await self._reconciler.run(claim)
        finally:
            self._jobs.pop(claim.id, None)
            # A slot is free: more may be waiting.
            self._wakeup.set()
