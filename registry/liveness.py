"""The liveness sweeper: silent workspaces go offline, stuck provisioning goes failed.

Safe with several registry processes: one sweep at a time holds a transaction-scoped
advisory lock (others skip that round), every statement is set-based and uses the database's
clock, and each row changes once with one event because the UPDATE re-checks its WHERE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from registry.db import Connection, fleet, transitions
from registry.db.errors import DatabaseUnavailable
from registry.guard import Before, GuardRules, judge
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
# Every process sweeps every interval (or finds another one sweeping, which writes the guard's
# row), so a row older than two intervals means nobody swept. Never under a few seconds: with
# tiny test intervals, one slow sweep must not read as an outage (that only delays expiry).
DEAF_MIN_MARGIN_S = 2.0


def deaf_after(sweep_interval_s: float) -> float:
    return max(2 * sweep_interval_s, sweep_interval_s + DEAF_MIN_MARGIN_S)


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
    # Releases at or below this share (never above mass_expiry_share): hysteresis.
    mass_expiry_release_share: float = 0.1
    # No sweep recorded for this long: no process was hearing heartbeats (all were down, or
    # the database was), so silence is counted afresh.
    deaf_after_s: float | None = None  # None: never

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
            mass_expiry_release_share=settings.mass_expiry_release_share,
            deaf_after_s=deaf_after(settings.sweep_interval_s),
        )

    @property
    def guard_rules(self) -> GuardRules:
        return GuardRules(
            share=self.mass_expiry_share,
            release_share=min(self.mass_expiry_release_share, self.mass_expiry_share),
            min_fleet=self.mass_expiry_min_fleet,
            rate=self.mass_expiry_rate,
            window_s=self.offline_after_s,
        )


async def sweep(
    conn: Connection, policy: SweepPolicy, *, expire: bool = True, deaf: bool = False
) -> SweepResult:
    """One sweep, in one transaction; skipped when another process is sweeping.

    With `expire` False (a sweeper in its start-up grace window) it only counts and writes the
    guard's figures, so /fleet is fresh from the first sweep after a start, and judges nobody.
    `deaf`: this process could not reach the database since its last sweep, so runtimes'
    heartbeats may have been refused; silence is counted from now (so it is too when no
    process swept for `deaf_after_s`).
    """
    async with conn.transaction():
        if not await conn.fetchval(TRY_SWEEP_LOCK, SWEEP_LOCK_KEY):
            return SweepResult(swept=False)
        # A mass expiry sorts up to the whole fleet by silence; keep that sort in memory.
        await conn.execute(SWEEP_WORK_MEM)
        # Before anything is counted: after an outage, every workspace's window starts now.
        counted_from = await fleet.hear_again(conn, deaf=deaf, deaf_after_s=policy.deaf_after_s)
        count = await transitions.count_silent(
            conn, LIVE, policy.offline_after_s, policy.live_window, counted_from
        )
        # The window is the configured liveness window: within it, a fleet that is really
        # going away has gone silent, however its heartbeats were spread.
        recent = await fleet.recent_expirations(conn, policy.offline_after_s)
        if not expire:
            holding = await fleet.write_figures(
                conn, live=count.live, stale=count.silent, expired=recent
            )
            return SweepResult(swept=True, holding=holding)
        before = await fleet.read_guard(conn)
        assert before.now is not None
        judgement = judge(
            policy.guard_rules,
            Before(
                holding=before.holding,
                stale=before.stale,
                silent_changed_at=before.silent_changed_at,
                released_at=before.released_at,
            ),
            live=count.live,
            silent=count.silent,
            expired=recent,
            now=before.now,
        )
        holding = judgement.holding
        limit = judgement.limit
        if holding and before.acknowledged:
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
            counted_from=counted_from,
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
            counted_from=counted_from,
        )
        # Figures after this sweep: what is still live and silent, and the window's
        # expirations including this sweep's.
        changed = await fleet.write_guard(
            conn,
            holding=holding,
            live=count.live - gone,
            stale=max(0, count.silent - gone),
            expired=recent + gone,
            silent_changed_at=judgement.silent_changed_at,
            released_at=judgement.released_at,
        )
        if changed:
            log.warning(
                "mass-expiry guard %s: %d of %d live workspaces silent, %d expired within "
                "the last %g s",
                "holding" if holding else "released (rate-limited for one more window)",
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
    failed meanwhile, and the fleet must get a chance to call in before it is judged. The
    same holds when the database was down under a running process: `unreachable()` (a sweep
    or a heartbeat batch that could not reach it) makes the next sweep count silence afresh.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        refused: Callable[[], int] = lambda: 0,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._policy = SweepPolicy.from_settings(settings)
        self._interval_s = settings.sweep_interval_s
        self._clock = clock
        self._grace_until = clock() + self._policy.offline_after_s
        self._deaf = False
        # How many heartbeat batches were refused for an unreachable database (ingest.py),
        # and how many of those the last sweep already took into account.
        self._refused = refused
        self._refused_seen = refused()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def unreachable(self) -> None:
        """This process could not reach the database: heartbeats may have been refused."""
        self._deaf = True

    def _count(self, result: SweepResult) -> None:
        if not result.swept:
            return
        for (source, target), n in result.moved.items():
            self._metrics.sweeper_expired.labels(target.value).inc(n)
            cause = "heartbeat_timeout" if target is Status.OFFLINE else "provision_timeout"
            self._metrics.transitions.labels(source.value, target.value, cause).inc(n)
        self._metrics.mass_expiry_guard_holding.set(1 if result.holding else 0)

    async def sweep_once(self, conn: Connection) -> SweepResult:
        """One sweep on `conn`, with this process's grace window and what it saw of the
        database. A sweep that fails or is skipped leaves that for the next one."""
        # In the grace window it still counts (fresh /fleet figures), but expires nothing.
        expire = self._clock() >= self._grace_until
        refused = self._refused()
        deaf = self._deaf or refused != self._refused_seen
        started = time.perf_counter()
        result = await sweep(conn, self._policy, expire=expire, deaf=deaf)
        # Skipped (another process swept, not knowing what this one saw): the next one tells.
        if result.swept:
            self._deaf, self._refused_seen = False, refused
            self._metrics.sweep_duration.set(time.perf_counter() - started)
            self._metrics.sweep_last_run.set(time.time())
        self._count(result)
        return result

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    result = await self.sweep_once(conn)
                if result.moved:
                    log.info(
                        "sweep: %d offline, %d failed",
                        result.count(Status.OFFLINE),
                        result.count(Status.FAILED),
                    )
            except DatabaseUnavailable as exc:
                self.unreachable()
                log.warning("sweep skipped: database unavailable: %s", exc)
            except Exception:
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
