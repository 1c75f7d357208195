"""Forward-only plain-SQL migrations: ordered, checksummed, serialised by an advisory lock."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

from registry.db import Connection

log = logging.getLogger(__name__)

# The top-level migrations/ folder, which the build maps into the package (see pyproject.toml):
# the same lookup works in an editable install and in an installed wheel.
MIGRATIONS_PACKAGE = "registry.migrations"

# Any constant works; it only has to be the same for every registry process.
MIGRATION_LOCK_KEY = 0x7265_6769_7374_7279  # "registry"

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

SELECT_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"

INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(RuntimeError):
    """The database's migration history does not match the files shipped with this code."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def packaged_migrations() -> Traversable:
    """The folder of migrations shipped with this code."""
    try:
        return resources.files(MIGRATIONS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise MigrationError(
            f"no migrations found: {MIGRATIONS_PACKAGE} is not installed, the install is incomplete"
        ) from exc


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    directory = packaged_migrations() if directory is None else directory
    migrations = []
    # Only the SQL files: the folder is also a package (its __init__.py, a __pycache__).
    for path in sorted(
        (p for p in directory.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name
    ):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    if not migrations:
        # An install that lost its migrations must not start on an empty schema and call
        # itself ready.
        raise MigrationError(f"no migrations found in {directory}: the install is incomplete")
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return migrations


def _check_history(applied: list[asyncpg.Record], known: dict[int, Migration]) -> None:
    for row in applied:
        migration = known.get(row["version"])
        if migration is None:
            raise MigrationError(
                f"database has migration {row['version']} ({row['name']}) that this code "
                "does not know: is an older registry running against a newer schema?"
            )
        if migration.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {row['version']} ({row['name']}) was changed after it was applied"
            )


async def pending_migrations(
    conn: Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Migrations not yet applied; raises MigrationError if the history does not match."""
    migrations = load_migrations() if migrations is None else migrations
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = await conn.fetch(SELECT_APPLIED) if exists else []
    _check_history(applied, {m.version: m for m in migrations})
    done = {row["version"] for row in applied}
    return [m for m in migrations if m.version not in done]


async def migrate(
    dsn: str, migrations: list[Migration] | None = None, *, connect_timeout_s: float = 60.0
) -> list[Migration]:
    """Apply pending migrations, each in its own transaction; returns the ones applied."""
    migrations = load_migrations() if migrations is None else migrations
    conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
    try:
        # A session lock on a dedicated connection: replicas starting together wait here,
        # then find nothing left to do.
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(CREATE_LEDGER)
            applied = []
            for migration in await pending_migrations(conn, migrations):
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        INSERT_APPLIED, migration.version, migration.name, migration.checksum
                    )
                log.info("applied migration %04d_%s", migration.version, migration.name)
                applied.append(migration)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
