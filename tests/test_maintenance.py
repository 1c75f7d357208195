"""The start-up check of the server's maintenance: autovacuum off is said loudly, once."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from registry.db.maintenance import check_server, maintenance_problems
from registry.db.migrate import migrate


async def _server_autovacuum(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT current_setting('autovacuum')::boolean"))


async def test_the_server_setting_is_reported_exactly_when_autovacuum_is_off(
    db: asyncpg.Connection,
) -> None:
    # The test cannot change a server-wide setting: it checks the report against the server
    # it runs on (off on this machine's PostgreSQL, on in the container's).
    problems = await maintenance_problems(db)
    off = not await _server_autovacuum(db)
    assert ("the server runs with autovacuum = off" in problems) is off


async def test_a_table_with_autovacuum_disabled_is_named(
    empty_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert not [p for p in await maintenance_problems(conn) if p.startswith("table ")]
        await conn.execute("ALTER TABLE workspaces SET (autovacuum_enabled = false)")
        with caplog.at_level(logging.WARNING, logger="registry.db.maintenance"):
            problems = await check_server(empty_dsn, connect_timeout_s=10)
    finally:
        await conn.close()
    assert "table workspaces has autovacuum_enabled = false" in problems
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("table workspaces has autovacuum_enabled = false" in w for w in warned)
    assert all("turn autovacuum on" in w for w in warned)


async def test_a_check_that_cannot_connect_warns_and_lets_start_up_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    with caplog.at_level(logging.WARNING, logger="registry.db.maintenance"):
        problems = await check_server(
            "postgresql://postgres@127.0.0.1:9/postgres", connect_timeout_s=5
        )
    assert problems == []
    assert any("database maintenance not checked" in r.getMessage() for r in caplog.records)
