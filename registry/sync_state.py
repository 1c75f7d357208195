"""The stored `plugins_sync` (workspaces.plugins_sync) kept equal to the derived one.

The database marks every workspace whose recorded plugin state changed, in the writer's own
transaction, whoever the writer is (triggers: migrations/0016_stored_plugins_sync.sql). This
judges the marked workspaces again with the one derivation (registry/verdicts.py's
`recorded_sync`), stores what changed and clears the marks it read, in one transaction.
Every registry process runs it about once a second; one at a time (an advisory lock), so two
judgements from different moments can never overwrite each other out of order.

A stored value is exact for a workspace with no mark; one with a mark (changed within the
last second or so, or never judged: NULL) is judged by the reader itself (the list filters).
The allowlist, a setting of each process, is not part of the stored value: see
`recorded_sync` and registry/db/filters.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from registry.db import Connection, actions, reconciles, workspaces
from registry.db.actions import PendingAction
from registry.db.errors import DatabaseUnavailable
from registry.db.reconciles import Reconcile
from registry.db.workspaces import WORKSPACE_COLUMNS, DeclaredPlugin, InstalledPlugin, Workspace
from registry.verdicts import Liveness, Recorded, recorded_sync

log = logging.getLogger(__name__)

REFRESH_LOCK_KEY = 0x7379_6E63  # "sync"
REFRESH_INTERVAL_S = 1.0
# Workspaces judged per transaction, at most.
MARKS_PER_BATCH = 2000

LOCK = "SELECT pg_advisory_xact_lock($1)"
# For this transaction only: how long a lock (the one above included) may be waited for.
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"

# Every mark of up to $1 marked workspaces (a workspace changed by several rows has several),
# among those committed when this statement starts; marks committed later stay for the next
# round, so a change that commits while a batch is judged is judged again, never lost.
TAKE_MARKS = """
DELETE FROM plugins_sync_dirty
WHERE workspace_id = ANY(ARRAY(SELECT workspace_id FROM plugins_sync_dirty LIMIT $1))
RETURNING workspace_id
"""

SELECT_MARKED = f"""
SELECT {WORKSPACE_COLUMNS}, plugins_sync AS stored_sync FROM workspaces
WHERE id = ANY($1::uuid[])
"""

# Locked in id order, as heartbeats lock them, so this never deadlocks with a heartbeat batch.
STORE = """
WITH locked AS (
    SELECT id FROM workspaces WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE
)
UPDATE workspaces w SET plugins_sync = v.sync
FROM unnest($1::uuid[], $2::text[]) AS v(id, sync) JOIN locked l ON l.id = v.id
WHERE w.id = v.id
"""

# What `recorded_sync` reads is all recorded; the rest of Recorded is not consulted by it.
_UNUSED_LIVENESS = Liveness(0.0, 0.0)
_UNUSED_NOW = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True, slots=True)
class PluginRecords:
    """What was recorded about the plugins of a page of workspaces: one statement per table
    for the whole page, not per workspace."""

    declared: dict[uuid.UUID, list[DeclaredPlugin]]
    installed: dict[uuid.UUID, list[InstalledPlugin]]
    last: dict[uuid.UUID, Reconcile]
    pending: dict[uuid.UUID, list[PendingAction]]

    @classmethod
    async def read(cls, conn: Connection, ids: list[uuid.UUID]) -> PluginRecords:
        return cls(
            declared=await workspaces.declared_plugins_of(conn, ids),
            installed=await workspaces.installed_plugins_of(conn, ids),
            last=await reconciles.last_reconciles(conn, ids),
            pending=await actions.pending_actions_of(conn, ids),
        )

    def recorded(
        self, workspace: Workspace, liveness: Liveness, now: datetime, **more: Any
    ) -> Recorded:
        return Recorded(
            workspace,
            declared=self.declared[workspace.id],
            installed=self.installed[workspace.id],
            last=self.last.get(workspace.id),
            liveness=liveness,
            now=now,
            pending=self.pending[workspace.id],
            **more,
        )


async def judge_marked(conn: Connection, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The derived value of each workspace that exists and whose stored value differs."""
    rows = await conn.fetch(SELECT_MARKED, ids)
    records = await PluginRecords.read(conn, [r["id"] for r in rows])
    changed = {}
    for row in rows:
        workspace = Workspace.from_record(row)
        sync = recorded_sync(records.recorded(workspace, _UNUSED_LIVENESS, _UNUSED_NOW))
        if sync.value != row["stored_sync"]:
            changed[workspace.id] = sync.value
    return changed


async def refresh(
    conn: Connection,
    *,
    batch: int = MARKS_PER_BATCH,
    rounds: int | None = None,
    lock_wait_s: float | None = None,
) -> int:
    """Judge every marked workspace again (at most `rounds` batches of marks); returns how
    many stored values changed. With `lock_wait_s`, a caller that must answer soon (a
    scrape) waits at most that long for another process's judging, then judges nothing."""
    stored = 0
    while rounds is None or rounds > 0:
        rounds = None if rounds is None else rounds - 1
        try:
            async with conn.transaction():
                if lock_wait_s is not None:
                    await conn.execute(SET_LOCK_TIMEOUT, f"{max(1, round(lock_wait_s * 1000))}ms")
                await conn.execute(LOCK, REFRESH_LOCK_KEY)
                marks = {row["workspace_id"] for row in await conn.fetch(TAKE_MARKS, batch)}
                if not marks:
                    return stored
                changed = await judge_marked(conn, sorted(marks))
                if changed:
                    await conn.execute(STORE, list(changed), list(changed.values()))
        except asyncpg.LockNotAvailableError:
            log.info("plugins_sync not judged: another process held the lock %.1f s", lock_wait_s)
            return stored
        stored += len(changed)
    return stored


async def run_forever(
    pool: asyncpg.Pool, stop: asyncio.Event, interval_s: float = REFRESH_INTERVAL_S
) -> None:
    while not stop.is_set():
        try:
            async with pool.acquire() as conn:
                await refresh(conn)
        except DatabaseUnavailable as exc:
            log.warning("plugins_sync not refreshed: database unavailable: %s", exc)
        except Exception:
            log.exception("refreshing the stored plugins_sync failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
