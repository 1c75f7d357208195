"""Refused runtime requests, made visible: recorded on the workspace, logged, rate-limited.

A runtime whose beats are refused (400 on a field, 401 on a rotated token, 403, 410 after a
delete) usually ignores the status code and beats on; without this nobody would see it. A
refusal is buffered in memory by token hash (the token identifies the workspace even when
the body does not parse) and written by a flusher every few seconds in one set-based
statement, so a fleet refused on every beat costs one write per workspace per flush, and an
accepted beat costs nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from registry.db import Connection
from registry.db.errors import DatabaseUnavailable
from registry.metrics import Metrics
from registry.tolerance import RateLimit

log = logging.getLogger(__name__)

# Warnings about one workspace's refused requests, at most this often.
REFUSAL_LOG_EVERY_S = 60.0
# Distinct tokens buffered between two flushes; beyond it refusals are counted, not kept
# (random tokens from an abuser must not grow memory).
MAX_PENDING = 10_000


@dataclass(slots=True)
class _Refusals:
    status: int
    code: str
    field: str | None
    count: int
    # Monotonic seconds: the flush turns them into ages the database stamps with its own
    # clock, so a refusal's time and every other time in a view come from one clock.
    first_at: float
    last_at: float


# A refusal is keyed by its token (the workspace's current one or its previous, rotated
# one), or by the workspace id the body named when the token matched nobody. The count runs
# from the first refusal after the last accepted beat, so it says how long this has gone on.
_RECORD_REFUSALS = """
WITH r AS (
    SELECT * FROM unnest($1::bytea[], $2::uuid[], $3::int[], $4::text[], $5::text[],
                         $6::int[], $7::float8[], $8::float8[])
        AS r(token_hash, workspace_id, status, code, field, n, first_age_s, last_age_s)
),
-- Ages (seconds before the flush) stamped by the database clock, not this host's.
stamped AS (
    SELECT r.*, now() - make_interval(secs => r.first_age_s) AS first_at,
           now() - make_interval(secs => r.last_age_s) AS last_at
    FROM r
),
owner AS (
    SELECT w.id, r.* FROM stamped r JOIN {table} w ON w.token_hash = r.token_hash
    UNION ALL
    SELECT w.id, r.* FROM stamped r JOIN {table} w ON w.previous_token_hash = r.token_hash
    UNION ALL
    SELECT w.id, r.* FROM stamped r JOIN {table} w ON w.id = r.workspace_id
),
ongoing AS (
    SELECT o.*, w.refused_since > COALESCE(w.last_heartbeat_at, '-infinity') AS continues
    FROM owner o JOIN {table} w ON w.id = o.id
)
UPDATE {table} w SET
    refused_at = o.last_at,
    refused_status = o.status,
    refused_code = o.code,
    refused_field = o.field,
    refused_count = CASE WHEN o.continues THEN w.refused_count + o.n ELSE o.n END,
    refused_since = CASE WHEN o.continues THEN w.refused_since ELSE o.first_at END
FROM ongoing o
WHERE w.id = o.id
RETURNING w.id, o.status, o.code, o.field, w.refused_count
"""
# Live workspaces, then tombstones (a table of their own, migration 0017): a removed
# workspace's runtime still beating shows its 410s on the tombstone.
RECORD_REFUSALS = tuple(
    _RECORD_REFUSALS.format(table=table) for table in ("workspaces", "removed_workspaces")
)


# Who was refused: a token's hash, or (for a token of nobody) the workspace id it claimed.
RefusedKey = bytes | uuid.UUID


class RefusalLog:
    """Buffers refusals by token hash (or claimed workspace id) until `flush` writes them."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        log_every_s: float = REFUSAL_LOG_EVERY_S,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._log_limit = RateLimit(log_every_s)
        self._max_pending = max_pending
        self._clock = clock
        self._pending: dict[RefusedKey, _Refusals] = {}

    def record(self, key: RefusedKey, status: int, code: str, field: str | None) -> None:
        now = self._clock()
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= self._max_pending:
                self._metrics.refusals_unrecorded.inc()
                return
            self._pending[key] = _Refusals(status, code, field, 1, now, now)
            return
        entry.status, entry.code, entry.field = status, code, field
        entry.count += 1
        entry.last_at = now

    async def flush(self, conn: Connection) -> int:
        """Write what is buffered; returns how many workspaces it was written to."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        now = self._clock()
        args = (
            [k if isinstance(k, bytes) else None for k in pending],
            [k if isinstance(k, uuid.UUID) else None for k in pending],
            [r.status for r in pending.values()],
            [r.code for r in pending.values()],
            [r.field for r in pending.values()],
            [r.count for r in pending.values()],
            [now - r.first_at for r in pending.values()],
            [now - r.last_at for r in pending.values()],
        )
        try:
            async with conn.transaction():  # all or nothing: a failed flush is retried whole
                rows = [row for sql in RECORD_REFUSALS for row in await conn.fetch(sql, *args)]
        except BaseException:
            self._merge_back(pending)
            raise
        for row in rows:
            if self._log_limit.allow(row["id"]):
                log.warning(
                    "runtime requests of workspace %s are refused: %d %s%s (%d times; "
                    "logged once a minute)",
                    row["id"],
                    row["status"],
                    row["code"],
                    "" if row["field"] is None else f" (field {row['field']})",
                    row["refused_count"],
                    extra={"workspace_id": str(row["id"]), "code": row["code"]},
                )
        return len(rows)

    def _merge_back(self, pending: dict[RefusedKey, _Refusals]) -> None:
        """A failed flush keeps its refusals for the next one (newer ones win)."""
        for key, entry in pending.items():
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = entry
            else:
                newer.count += entry.count
                newer.first_at = entry.first_at

    async def run_forever(self, pool: asyncpg.Pool, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            try:
                async with pool.acquire() as conn:
                    await self.flush(conn)
            except DatabaseUnavailable as exc:
                log.warning("refusals not recorded yet: database unavailable: %s", exc)
            except Exception:
                log.exception("recording refusals failed")
