"""Migrations: applied once each, in order, checksummed, serialised across processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from registry.db import migrate as migrate_module
from registry.db.migrate import MigrationError, load_migrations, migrate, pending_migrations


async def test_migrate_applies_each_migration_once(empty_dsn: str) -> None:
    first = await migrate(empty_dsn)
    second = await migrate(empty_dsn)

    assert [m.version for m in first] == [m.version for m in load_migrations()]
    assert second == []
    conn = await asyncpg.connect(empty_dsn)
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    await conn.close()
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in load_migrations()
    ]


async def test_concurrent_migrations_are_serialised(empty_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(empty_dsn) for _ in range(4)))

    applied = [m.version for result in results for m in result]
    assert sorted(applied) == [m.version for m in load_migrations()]


async def test_a_changed_migration_is_refused(empty_dsn: str, tmp_path: Path) -> None:
    await migrate(empty_dsn)
    edited = tmp_path / "migrations"
    edited.mkdir()
    for migration in load_migrations():
        path = edited / f"{migration.version:04d}_{migration.name}.sql"
        path.write_text(migration.sql + "\n-- edited\n")

    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_dsn, load_migrations(edited))


async def test_a_failing_migration_leaves_nothing_behind(empty_dsn: str, tmp_path: Path) -> None:
    broken = tmp_path / "migrations"
    broken.mkdir()
    (broken / "0001_half.sql").write_text("CREATE TABLE half (id int); SELECT 1/0;")

    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_dsn, load_migrations(broken))

    conn = await asyncpg.connect(empty_dsn)
    assert await conn.fetchval("SELECT to_regclass('half')") is None
    assert await pending_migrations(conn, load_migrations(broken)) != []
    await conn.close()


def test_finding_no_migrations_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found"):
        load_migrations(tmp_path)


def test_an_install_without_the_migrations_package_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(migrate_module, "MIGRATIONS_PACKAGE", "registry.no_such_migrations")

    with pytest.raises(MigrationError, match="is not installed"):
        load_migrations()


def test_the_shipped_migrations_are_the_top_level_folder() -> None:
    # One source of truth: the package's migrations are the files of migrations/ themselves.
    top_level = Path(__file__).resolve().parents[1] / "migrations"

    assert [f"{m.version:04d}_{m.name}.sql" for m in load_migrations()] == sorted(
        path.name for path in top_level.glob("*.sql")
    )
    assert [m.sql for m in load_migrations()] == [
        path.read_text(encoding="utf-8") for path in sorted(top_level.glob("*.sql"))
    ]
