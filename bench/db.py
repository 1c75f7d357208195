"""Bench databases: created, migrated and dropped on a PostgreSQL server the bench is given."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from registry.db.migrate import Migration, migrate

DEFAULT_SERVER_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# The name is interpolated into CREATE/DROP DATABASE (identifiers cannot be parameters), so
# only plain bench_* names are accepted: a bench must never drop someone else's database.
_NAME = re.compile(r"^bench_[a-z0-9_]{1,50}$")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_options(dsn: str, options: tuple[str, ...]) -> str:
    """Append NAME=VALUE settings as DSN query parameters (asyncpg sends them as settings)."""
    if not options:
        return dsn
    parts = urlsplit(dsn)
    query = "&".join(filter(None, [parts.query, *(quote(o, safe="=") for o in options)]))
    return urlunsplit(parts._replace(query=query))


def check_name(database: str) -> str:
    if not _NAME.match(database):
        raise ValueError(f"bench database names look like bench_[a-z0-9_]+, got {database!r}")
    return database


async def recreate(
    server_dsn: str, database: str, migrations: list[Migration] | None = None
) -> str:
    """Drop and create `database`, apply the registry's migrations (or those given: another
    revision's); returns its DSN."""
    check_name(database)
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    dsn = with_database(server_dsn, database)
    await migrate(dsn, migrations)
    return dsn


async def drop(server_dsn: str, database: str) -> None:
    check_name(database)
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


async def execute(dsn: str, *statements: str) -> None:
    """Run maintenance statements (CHECKPOINT, VACUUM) outside any transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def wal_lsn(dsn: str) -> int:
    """The cluster's current WAL position in bytes (every database's writes move it)."""
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    finally:
        await conn.close()
    return int(value)
