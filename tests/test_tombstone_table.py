"""Tombstones in a table of their own (migration 0017): the move, its schema invariant, and
the migration that moved the tombstones already there."""

from __future__ import annotations

import asyncpg

from registry.db.migrate import load_migrations, migrate

COLUMNS = """
SELECT column_name, data_type, is_nullable FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position
"""


async def test_removed_workspaces_has_the_columns_of_workspaces_in_their_order(
    empty_dsn: str,
) -> None:
    """A row moves with `SELECT *`: a column added to one table must be added to the other."""
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        live = [tuple(r) for r in await conn.fetch(COLUMNS, "workspaces")]
        removed = [tuple(r) for r in await conn.fetch(COLUMNS, "removed_workspaces")]
        shown = [tuple(r) for r in await conn.fetch(COLUMNS, "all_workspaces")]
    finally:
        await conn.close()
    assert live == removed
    assert [c[:2] for c in shown] == [c[:2] for c in live]


async def test_any_writer_that_removes_a_workspace_moves_it(empty_dsn: str) -> None:
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(
            "INSERT INTO workspaces (name, token_hash, status) VALUES"
            " ('updated', 'u', 'provisioning'), ('kept', 'k', 'provisioning'),"
            " ('inserted', 'i', 'removed')"
        )
        await conn.execute("UPDATE workspaces SET status = 'removed' WHERE name = 'updated'")
        live = {r["name"] for r in await conn.fetch("SELECT name FROM workspaces")}
        removed = {r["name"] for r in await conn.fetch("SELECT name FROM removed_workspaces")}
        count = await conn.fetchval("SELECT n FROM tombstone_count")
    finally:
        await conn.close()
    assert (live, removed, count) == ({"kept"}, {"updated", "inserted"}, 2)


async def test_the_migration_moves_existing_tombstones_with_their_history(
    empty_dsn: str,
) -> None:
    await migrate(empty_dsn, [m for m in load_migrations() if m.version < 17])
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(
            "INSERT INTO workspaces (id, name, token_hash) VALUES"
            " ('00000000-0000-0000-0000-000000000001', 'live', 'l'),"
            " ('00000000-0000-0000-0000-000000000002', 'gone', 'g')"
        )
        gone = "00000000-0000-0000-0000-000000000002"
        await conn.execute(f"UPDATE workspaces SET status = 'removed' WHERE id = '{gone}'")
        await conn.execute(
            "INSERT INTO declared_plugins (workspace_id, name, source, position)"
            f" VALUES ('{gone}', 'a', 'file:///a', 1)"
        )
        await conn.execute(
            f"INSERT INTO reconciles (workspace_id, trigger, status) VALUES ('{gone}', 'manual',"
            " 'succeeded')"
        )
        await migrate(empty_dsn)
        live = [r["name"] for r in await conn.fetch("SELECT name FROM workspaces")]
        removed = await conn.fetch("SELECT name, status FROM removed_workspaces")
        count = await conn.fetchval("SELECT n FROM tombstone_count")
        kept = await conn.fetchval(
            f"SELECT (SELECT count(*) FROM declared_plugins WHERE workspace_id = '{gone}')"
            f" + (SELECT count(*) FROM reconciles WHERE workspace_id = '{gone}')"
        )
    finally:
        await conn.close()
    assert live == ["live"]
    assert [tuple(r) for r in removed] == [("gone", "removed")]
    assert count == 1
    assert kept == 2
