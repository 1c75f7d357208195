"""The drift check: a periodic catch-all for boxes that lost their plugins unnoticed.

The heartbeat queues a reconcile when a box visibly restarted or changed (registry/db/
heartbeats.py); a box replaced right after a restart was handed out looks like that restart,
and one replaced without its uptime going down looks like nothing at all. Its report of its
plugins tells the truth either way: when it keeps reporting fewer than the registry recorded,
this loop queues a reconcile (trigger `drift_detected`), rate-limited per workspace. It runs
beside the heartbeat, not in it, so a beat costs no extra statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from registry.db.drift import queue_drifted
from registry.db.errors import DatabaseUnavailable
from registry.settings import Settings

log = logging.getLogger(__name__)

# Workspaces queued per check at most: a fleet that drifted all at once (a registry restored
# from an old backup, say) is reconciled over several checks instead of in one burst.
BATCH = 500


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    settle_s: float
    every_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftPolicy:
        return cls(settings.drift_settle_s, settings.drift_reconcile_every_s)

    @property
    def check_every_s(self) -> float:
        # Once per settle time: drift is acted on within two settle times of its start, and a
        # check (~0.5 s of the database at 100k workspaces) costs it ~1% of a core at 60 s.
        return max(1.0, self.settle_s)


class DriftChecker:
    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, wake_reconciler: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._policy = DriftPolicy.from_settings(settings)
        self._wake = wake_reconciler
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def check(self) -> list[uuid.UUID]:
        async with self._pool.acquire() as conn:
            queued = await queue_drifted(
                conn, settle_s=self._policy.settle_s, every_s=self._policy.every_s, limit=BATCH
            )
        if queued:
            log.info(
                "drift: %d workspace(s) do not report plugins recorded as installed; "
                "reconcile queued",
                len(queued),
            )
            self._wake()
        return queued

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._policy.check_every_s)
            if self._stop.is_set():
                break
            try:
                await self.check()
            except DatabaseUnavailable as exc:
                log.warning("drift check skipped: database unavailable: %s", exc)
            except Exception:
                log.exception("drift check failed")
