"""The liveness sweeper: silent workspaces go offline, stuck provisioning goes failed.

Safe with several registry processes: one sweep at a time holds a transaction-scoped
advisory lock (others skip that round), every statement is set-based and uses the database's
clock, and each row changes once with one event because the UPDATE re-checks its WHERE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import asyncpg

from registry.db import Connection, fleet, transitions
from registry.db.errors import DatabaseUnavailable
from registry.metrics import Metrics
from registry.settings import Settings
from registry.statuses import LIVE, Status

log = logging.getLogger(__name__)

SWEEP_LOCK_KEY = 0x7377_6565_7065_72  # "sweeper"
TRY_SWEEP_LOCK = "SELECT pg_try_advisory_xact_lock($1)"
SWEEP_WORK_MEM = "SET LOCAL work_mem = '64MB'"

# Provisioning timeouts are not subject to the mass-expiry guard, but are still bounded so a
# single sweep's transaction stays short.
MAX_FAILED_PER_SWEEP = 10_000
# A live workspace is offline after this many of its own observed heartbeat intervals of
# silence, when that is longer than the configured window: a runtime on a fixed 30 s
# interval must not flap against a registry configured for 5 s.
OBSERVED_INTERVALS = 3.0


@dataclass(frozen=True, slots=True)
class SweepResult:
    swept: bool  # False: another process held the sweep lock
    # Workspaces moved, by (from, to) status.
    moved: dict[tuple[Status, Status], int] = field(default_factory=dict)
    holding: bool = False

    def count(self, to: Status) -> int:
        return sum(n for (_, target), n in self.moved.items() if target is to)


@dataclass(frozen=True, slots=True)
class SweepPolicy:
    offline_after_s: float
    provision_timeout_s: float
    mass_expiry_share: float
    mass_expiry_min_fleet: int
    mass_expiry_rate: float
    offline_after_max_s: float = 0.0

    @property
    def live_window(self) -> transitions.SilenceWindow:
        return transitions.SilenceWindow(OBSERVED_INTERVALS, self.offline_after_max_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> SweepPolicy:
        return cls(
            offline_after_s=settings.resolved_offline_after_s,
            provision_timeout_s=settings.provision_timeout_s,
            mass_expiry_share=settings.mass_expiry_share,
            mass_expiry_min_fleet=settings.mass_expiry_min_fleet,
            mass_expiry_rate=settings.mass_expiry_rate,
            offline_after_max_s=settings.offline_after_max_s,
        )

    def expiry_limit(self, live: int, silent: int, expired: int = 0) -> tuple[bool, int]:
        """(holding, how many may go offline this sweep) for a fleet of `live` with `silent`
        of them silent, `expired` having been taken offline within the last window.

        The guard judges a sliding window, not one sweep: an outage spread over several
        sweeps (heartbeats stopping over 20 s) looks small in each, yet takes the fleet. So it
        compares the silent ones plus the window's expirations with the fleet as it was a
        window ago (the live ones plus those expirations). Below the share every silent one
        expires, which keeps the window's expirations within the share; above, it holds.
        """
        fleet = live + expired
        holding = (
            fleet >= self.mass_expiry_min_fleet
            and silent + expired > self.mass_expiry_share * fleet
        )
        if not holding:
            return False, silent
        # A partition or a registry outage looks like a dead fleet; expire slowly until
        # heartbeats return, so a mistake costs a few workspaces, not all of them.
        return True, max(1, math.floor(self.mass_expiry_rate * fleet))


async def sweep(conn: Connection, policy: SweepPolicy, *, expire: bool = True) -> SweepResult:
    """One sweep, in one transaction; skipped when another process is sweeping.

    With `expire` False (a sweeper in its start-up grace window) it only counts and writes the
    guard's figures, so /fleet is fresh from the first sweep after a start, and judges nobody.
    """
    async with conn.transaction():
        if not await conn.fetchval(TRY_SWEEP_LOCK, SWEEP_LOCK_KEY):
            return SweepResult(swept=False)
        # A mass expiry sorts up to the whole fleet by silence; keep that sort in memory.
        await conn.execute(SWEEP_WORK_MEM)
        count = await transitions.count_silent(
            conn, LIVE, policy.offline_after_s, policy.live_window
        )
        # The window is the configured liveness window: within it, a fleet that is really
        # going away has gone silent, however its heartbeats were spread.
        recent = await fleet.recent_expirations(conn, policy.offline_after_s)
        if not expire:
            holding = await fleet.write_figures(
                conn, live=count.live, stale=count.silent, expired=recent
            )
            return SweepResult(swept=True, holding=holding)
        holding, limit = policy.expiry_limit(count.live, count.silent, recent)
        if holding and (await fleet.read_guard(conn)).acknowledged:
            # An operator said the silence is real (POST /fleet/guard/ack): expire it all.
            limit = count.silent
        expired = await transitions.expire_silent(
            conn,
            statuses=LIVE,
            silent_for_s=policy.offline_after_s,
            to=Status.OFFLINE,
            cause="heartbeat_timeout",
            limit=limit,
            window=policy.live_window,
        )
        gone = sum(expired.values())
        await fleet.record_expirations(conn, gone)
        failed = await transitions.expire_silent(
            conn,
            statuses=frozenset({Status.PROVISIONING}),
            silent_for_s=policy.provision_timeout_s,
            to=Status.FAILED,
            cause="provision_timeout",
            limit=MAX_FAILED_PER_SWEEP,
        )
        # Figures after this sweep: what is still live and silent, and the window's
        # expirations including this sweep's.
        changed = await fleet.write_guard(
            conn,
            holding=holding,
            live=count.live - gone,
            stale=max(0, count.silent - gone),
            expired=recent + gone,
        )
        if changed:
            log.warning(
                "mass-expiry guard %s: %d of %d live workspaces silent, %d expired within "
                "the last %g s",
                "holding" if holding else "released",
                count.silent,
                count.live,
                recent,
                policy.offline_after_s,
            )
    moved = {(source, Status.OFFLINE): n for source, n in expired.items()}
    moved |= {(source, Status.FAILED): n for source, n in failed.items()}
    return SweepResult(swept=True, moved=moved, holding=holding)


class LivenessSweeper:
    """Sweeps every interval, after one full liveness window from this process's start.

    The grace window matters when the registry itself was down: every runtime's heartbeats
    failed meanwhile, and the fleet must get a chance to call in before it is judged.
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._policy = SweepPolicy.from_settings(settings)
        self._interval_s = settings.sweep_interval_s
        self._grace_until = time.monotonic() + self._policy.offline_after_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _count(self, result: SweepResult) -> None:
        if not result.swept:
            return
        for (source, target), n in result.moved.items():
            self._metrics.sweeper_expired.labels(target.value).inc(n)
            cause = "heartbeat_timeout" if target is Status.OFFLINE else "provision_timeout"
            self._metrics.transitions.labels(source.value, target.value, cause).inc(n)
        self._metrics.mass_expiry_guard_holding.set(1 if result.holding else 0)

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            # In the grace window it still counts (fresh /fleet figures), but expires nothing.
            expire = time.monotonic() >= self._grace_until
            try:
                async with self._pool.acquire() as conn:
                    result = await sweep(conn, self._policy, expire=expire)
                self._count(result)
                if result.moved:
                    log.info(
                        "sweep: %d offline, %d failed",
                        result.count(Status.OFFLINE),
                        result.count(Status.FAILED),
                    )
            except DatabaseUnavailable as exc:
                log.warning("sweep skipped: database unavailable: %s", exc)
            except Exception:
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
