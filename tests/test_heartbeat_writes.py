"""The heartbeat statement writes a reported plugin list only when it changed."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import asyncpg

from registry.db.heartbeats import apply_beat
from tests.lock_support import insert_workspace
from tests.support import beat

# Large enough to be stored out of line (TOAST), as a box with many plugins reports it.
PLUGINS = [
    {"name": f"plugin-{i}", "sha": hashlib.sha1(f"{i}".encode()).hexdigest()}  # noqa: S324
    for i in range(500)
]

TOAST_INSERTS = (
    "SELECT pg_stat_get_xact_tuples_inserted(reltoastrelid) FROM pg_class "
    "WHERE oid = 'workspaces'::regclass"
)


async def _toast_rows_written(
    db: asyncpg.Connection, workspace: tuple[uuid.UUID, bytes], plugins: list[dict[str, str]]
) -> int:
    """TOAST rows one beat inserts, as this backend counts them inside the beat's transaction
    (this backend's own counters: no other session's work is in them)."""
    reported = dataclasses.replace(beat(*workspace), observed_plugins=plugins)
    async with db.transaction():
        # The counter also holds earlier transactions' counts not yet flushed: a difference.
        before: int = await db.fetchval(TOAST_INSERTS)
        await apply_beat(db, reported)
        after: int = await db.fetchval(TOAST_INSERTS)
    return after - before


async def test_an_unchanged_plugin_list_writes_no_toast_rows(db: asyncpg.Connection) -> None:
    """Mutant: `observed_plugins = COALESCE(reported, stored)` stores the list anew each beat."""
    workspace = await insert_workspace(db)
    first = await _toast_rows_written(db, workspace, PLUGINS)

    again = await _toast_rows_written(db, workspace, PLUGINS)
    changed = await _toast_rows_written(db, workspace, PLUGINS[1:])

    assert first > 0  # the list is stored out of line, so the counter can tell
    assert again == 0
    assert changed > 0
    stored = await db.fetchval(
        "SELECT observed_plugins FROM workspaces WHERE id = $1", workspace[0]
    )
    assert stored is not None
