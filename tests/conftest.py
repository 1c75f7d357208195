"""Shared fixtures: a real PostgreSQL, a migrated test database, and the app on top of it.

The database server is found in this order, and the suite fails loudly when none can be had:
1. REGISTRY_TEST_DSN: any PostgreSQL you point it at (the tests create their own database);
2. testcontainers, when a Docker daemon answers;
3. an embedded PostgreSQL the tests start themselves (the pgserver wheel).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from registry.app import create_app
from registry.db.migrate import migrate
from registry.embedded_pg import EmbeddedPostgresError, start_embedded_postgres
from registry.settings import Settings
from tests.fake_runtime import FakeRuntime
from tests.pg_cluster import StoppableCluster
from tests.support import ADMIN_TOKEN, Registry


def _docker_answers() -> bool:
    """Ask the daemon's /_ping directly: cheap, and leaks nothing when no daemon runs."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        parts = urlsplit(host)
        family, address = socket.AF_INET, (parts.hostname, parts.port or 2375)  # type: ignore[assignment]
    else:
        return False
    try:
        with socket.socket(family) as conn:
            conn.settimeout(1)
            conn.connect(address)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in conn.recv(64)
    except OSError:
        return False


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    explicit = os.environ.get("REGISTRY_TEST_DSN")
    if explicit:
        yield explicit
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    try:
        data_dir = Path(tempfile.mkdtemp(prefix="registry-test-pg-"))
        dsn, server = start_embedded_postgres(data_dir, keep_data=False)
    except EmbeddedPostgresError as exc:
        pytest.fail(
            "no PostgreSQL for the tests: REGISTRY_TEST_DSN is not set, no Docker daemon "
            f"answers, and the embedded PostgreSQL did not start: {exc!r}",
            pytrace=False,
        )
    yield dsn
    server.cleanup()


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def dsn(server_dsn: str) -> Iterator[str]:
    """A database of this run's own, migrated once; dropped at the end."""
    name = f"registry_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    database_dsn = with_database(server_dsn, name)
    asyncio.run(migrate(database_dsn))
    yield database_dsn
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


TABLES = (
    "workspace_actions",
    "reconcile_steps",
    "reconciles",
    "workspace_events",
    "installed_plugins",
    "declared_plugins",
    "workspaces",
)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to an emptied test database."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    await conn.execute("UPDATE fleet_guard SET holding = false, since = NULL, live = 0, stale = 0")
    await conn.execute("UPDATE retention_state SET events_pruned_through = 0")
    yield conn
    await conn.close()


@pytest.fixture
def plugin_sources(tmp_path: Path) -> Path:
    """Where tests put local plugin directories and git repositories (allowlisted)."""
    path = tmp_path / "sources"
    path.mkdir()
    return path


@pytest.fixture
def silent_git_server() -> Iterator[int]:
    """A TCP port that accepts git connections and never answers: a hung plugin source."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path, plugin_sources: Path, silent_git_server: int) -> Settings:
    return Settings(
        admin_token=ADMIN_TOKEN,
        data_dir=tmp_path / "data",
        plugins_dir=tmp_path / "plugins",
        plugin_allowlist=(
            f"file://{plugin_sources}/",
            f"git+file://{plugin_sources}/",
            f"git+git://127.0.0.1:{silent_git_server}/",
        ),
        reconcile_poll_s=0.2,
        reconcile_lease_s=3.0,
        reconcile_retry_base_s=0.05,
        reconcile_retry_cap_s=0.5,
        reconcile_timeout_s=30.0,
        fetch_timeout_s=20.0,
    )


MakeRegistry = Callable[..., Awaitable[Registry]]


@pytest.fixture
def make_registry(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient]],
    settings: Settings,
    dsn: str,
    db: asyncpg.Connection,
) -> MakeRegistry:
    """Start the app with some settings changed: `await make_registry(restart_budget=1)`."""

    async def make(**overrides: Any) -> Registry:
        changed = dataclasses.replace(settings, **overrides)
        return Registry(await aiohttp_client(create_app(changed, dsn)), db, changed)

    return make


@pytest.fixture
async def registry(make_registry: MakeRegistry) -> Registry:
    return await make_registry()


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    runtime = FakeRuntime()
    await runtime.start()
    yield runtime
    await runtime.close()


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoppableCluster]:
    """A migrated PostgreSQL of this test's own, to stop and start at will."""
    # A short path: the server's unix socket lives in its data directory.
    cluster = StoppableCluster(Path(tempfile.mkdtemp(prefix="pgc-")))
    cluster.start()
    asyncio.run(migrate(cluster.dsn))
    yield cluster
    with contextlib.suppress(Exception):
        cluster.stop()
    shutil.rmtree(cluster.data_dir, ignore_errors=True)
