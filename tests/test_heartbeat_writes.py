"""The heartbeat statement writes a reported plugin list only when it changed, and never in the
workspace's own row (migration 0019), so an unchanged report costs no WAL of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid

import asyncpg
import orjson

from registry.db.heartbeats import apply_beat
from tests.lock_support import connect, insert_workspace, wait_blocked
from tests.support import beat


def plugin_list(count: int, sha_seed: str = "") -> list[dict[str, str]]:
    return [
        {"name": f"plugin-{i}", "sha": hashlib.sha1(f"{sha_seed}{i}".encode()).hexdigest()}  # noqa: S324
        for i in range(count)
    ]


# 20 plugins stay inside a row (under ~2 KB): in `workspaces` they were written with every
# beat's new row version; 500 are stored out of line (TOAST).
SMALL = plugin_list(20)
LARGE = plugin_list(500)

REPORT_WRITES = (
    "SELECT pg_stat_get_xact_tuples_inserted(c.oid) + pg_stat_get_xact_tuples_updated(c.oid) "
    "+ COALESCE(pg_stat_get_xact_tuples_inserted(c.reltoastrelid), 0) "
    "FROM pg_class c WHERE c.oid = 'reported_plugins'::regclass"
)


async def _report_rows_written(
    db: asyncpg.Connection, workspace: tuple[uuid.UUID, bytes], plugins: list[dict[str, str]]
) -> int:
    """Rows (and TOAST rows) one beat writes to `reported_plugins`, as this backend counts
    them inside the beat's transaction (no other session's work is in these counters)."""
    reported = dataclasses.replace(beat(*workspace), observed_plugins=plugins)
    async with db.transaction():
        # The counter also holds earlier transactions' counts not yet flushed: a difference.
        before: int = await db.fetchval(REPORT_WRITES)
        await apply_beat(db, reported)
        after: int = await db.fetchval(REPORT_WRITES)
    return after - before


async def _stored(db: asyncpg.Connection, workspace_id: uuid.UUID) -> object:
    stored = await db.fetchval(
        "SELECT plugins::text FROM reported_plugins WHERE workspace_id = $1", workspace_id
    )
    return None if stored is None else orjson.loads(stored)


async def test_an_unchanged_plugin_list_is_not_written_again(db: asyncpg.Connection) -> None:
    """Mutant: upserting the report on every beat that has one writes it every beat."""
    for plugins in (SMALL, LARGE):
        workspace = await insert_workspace(db)
        first = await _report_rows_written(db, workspace, plugins)
        again = await _report_rows_written(db, workspace, plugins)
        changed = await _report_rows_written(db, workspace, plugins[1:])

        assert first > 0
        assert again == 0
        assert changed > 0
        assert await _stored(db, workspace[0]) == plugins[1:]


async def test_the_workspace_row_holds_no_plugin_list(db: asyncpg.Connection) -> None:
    """What made a small list cost WAL every beat: it was a column of the row every beat
    rewrites. The row keeps only its digest."""
    workspace = await insert_workspace(db)
    await _report_rows_written(db, workspace, SMALL)
    row_bytes: int = await db.fetchval(
        "SELECT pg_column_size(w.*) FROM workspaces w WHERE id = $1", workspace[0]
    )
    list_bytes: int = await db.fetchval(
        "SELECT pg_column_size(plugins) FROM reported_plugins WHERE workspace_id = $1",
        workspace[0],
    )
    assert list_bytes > 1000
    assert row_bytes < list_bytes


async def test_not_reporting_keeps_the_stored_list(db: asyncpg.Connection) -> None:
    workspace = await insert_workspace(db)
    await _report_rows_written(db, workspace, SMALL)
    await apply_beat(db, beat(*workspace))  # observed_plugins None: not reported
    assert await _stored(db, workspace[0]) == SMALL
    assert await _report_rows_written(db, workspace, []) > 0
    assert await _stored(db, workspace[0]) == []


async def test_a_beat_waiting_for_another_compares_with_what_that_one_stored(
    db: asyncpg.Connection, dsn: str
) -> None:
    """Two beats of one workspace in flight: the first reports a new list B (over A) and
    holds the row; the second, queued behind it, reports A again. The second must compare
    with B, what the first stored, and so write A back. Mutant: comparing with the stored
    list read by a join (not through the row it locked) sees the statement's snapshot, A,
    calls the report unchanged and leaves B stored while the box reports A."""
    workspace = await insert_workspace(db)
    old, new = plugin_list(3), plugin_list(3, sha_seed="new")
    await apply_beat(db, dataclasses.replace(beat(*workspace), observed_plugins=old))

    first, second = await connect(dsn), await connect(dsn)
    try:
        async with first.transaction():
            await apply_beat(first, dataclasses.replace(beat(*workspace), observed_plugins=new))
            waiting = asyncio.ensure_future(
                apply_beat(second, dataclasses.replace(beat(*workspace), observed_plugins=old))
            )
            await wait_blocked(db, second)
        await waiting
    finally:
        await first.close()
        await second.close()

    assert await _stored(db, workspace[0]) == old


async def test_a_copy_in_the_retired_column_leaves_the_row_at_the_next_beat(
    db: asyncpg.Connection,
) -> None:
    """During a rolling upgrade the previous release's processes still write the report into
    `workspaces.observed_plugins` (as here). This release's beat empties it, so the row is
    lean again, and the report it carries goes where this release reads it."""
    workspace = await insert_workspace(db)
    await db.execute(
        "UPDATE workspaces SET observed_plugins = $2::jsonb, observed_plugins_at = now() "
        "WHERE id = $1",
        workspace[0],
        orjson.dumps(SMALL).decode(),
    )
    await apply_beat(db, dataclasses.replace(beat(*workspace), observed_plugins=SMALL[:2]))
    kept = await db.fetchrow(
        "SELECT observed_plugins, observed_plugins_at FROM workspaces WHERE id = $1", workspace[0]
    )
    assert kept is not None and tuple(kept) == (None, None)
    assert await _stored(db, workspace[0]) == SMALL[:2]
