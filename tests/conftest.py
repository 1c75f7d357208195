"""Shared fixtures: a real PostgreSQL, a migrated test database, and the app on top of it.

The database server is found in this order, and the suite fails loudly when none can be had:
1. REGISTRY_TEST_DSN: any PostgreSQL you point it at (the tests create their own database);
2. testcontainers, when a Docker daemon answers and the container starts (REGISTRY_TEST_DOCKER=0
   never uses Docker, =1 requires it; see tests/pg_source.py);
3. an embedded PostgreSQL the tests start themselves (the pgserver wheel).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from registry.app import create_app
from registry.db.migrate import migrate
from registry.embedded_pg import EmbeddedPostgresError, start_embedded_postgres
from registry.settings import Settings
from tests.fake_runtime import FakeRuntime
from tests.pg_cluster import StoppableCluster
from tests.pg_source import (
    DEFAULT_IMAGE,
    IMAGE_ENV,
    SHARED_KEY,
    SharedContainer,
    container_dsn,
    docker_answers,
    docker_switch,
    shared_for_worker,
)
from tests.processes import Processes, registry_children
from tests.support import ADMIN_TOKEN, Registry


def _source() -> str:
    """Which PostgreSQL the chain will try first; printed in the pytest header."""
    if os.environ.get("REGISTRY_TEST_DSN"):
        return "dsn"
    switch = docker_switch()
    if switch is False:
        return "embedded"
    return "docker" if switch or docker_answers() else "embedded"


SHARED = pytest.StashKey[SharedContainer]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist, on the controller: one container for all workers, before they start.

    First, so that the header can name it and xdist's own sessionstart (trylast) starts the
    workers after it; the controller alone stops it (pytest_unconfigure), whatever they did.
    """
    config = session.config
    if config.pluginmanager.getplugin("dsession") is None or _source() != "docker":
        return
    shared = config.stash[SHARED] = SharedContainer()
    shared.start()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    shared = node.config.stash.get(SHARED, None)
    if shared is not None:
        node.workerinput[SHARED_KEY] = shared.for_workers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In pytest-xdist workers, the tests marked `long` first: started last, one of them
    alone outlasted all the other workers' tests (the schemathesis run, 90 s). Every worker
    orders alike (xdist checks their collections are the same); one process keeps the order."""
    if not hasattr(config, "workerinput"):
        return
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(SHARED, None)
    if shared is not None:
        shared.stop()


def pytest_report_header(config: pytest.Config) -> str:
    shared = config.stash.get(SHARED, None)
    if shared is not None and shared.container:
        image = os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)
        return (
            f"registry database: testcontainers container={shared.container} ({image}), "
            "one for all xdist workers, a database per worker"
        )
    if shared is not None:
        return (
            f"registry database: testcontainers did not start ({shared.error}); the workers "
            "use embedded unless REGISTRY_TEST_DOCKER=1"
        )
    source = _source()
    detail = {
        "dsn": "REGISTRY_TEST_DSN",
        "docker": f"testcontainers ({os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)}), "
        "else embedded unless REGISTRY_TEST_DOCKER=1",
        "embedded": "embedded (pgserver)",
    }[source]
    return f"registry database: {detail}"


def _embedded(reason: str) -> Iterator[str]:
    try:
        data_dir = Path(tempfile.mkdtemp(prefix="registry-test-pg-"))
        dsn, server = start_embedded_postgres(data_dir, keep_data=False)
    except EmbeddedPostgresError as exc:
        pytest.fail(
            f"no PostgreSQL for the tests: {reason}, and the embedded PostgreSQL did not "
            f"start: {exc!r}",
            pytrace=False,
        )
    yield dsn
    server.cleanup()


def _container_failed(error: str, say: Callable[[str], None]) -> Iterator[str]:
    if docker_switch():
        pytest.fail(
            f"REGISTRY_TEST_DOCKER=1 but Docker could not serve a PostgreSQL: {error}",
            pytrace=False,
        )
    say(f"Docker answers but the container did not start ({error}); using embedded")
    yield from _embedded("the Docker container did not start")


@pytest.fixture(scope="session")
def server_dsn(pytestconfig: pytest.Config) -> Iterator[str]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"\nregistry database: {line}")

    explicit = os.environ.get("REGISTRY_TEST_DSN")
    if explicit:
        say("dsn=REGISTRY_TEST_DSN")
        yield explicit
        return
    shared = shared_for_worker(getattr(pytestconfig, "workerinput", None))
    if shared is not None and "dsn" in shared:
        say(f"dsn=testcontainers container={shared['container']} (the xdist controller's)")
        yield shared["dsn"]
        return
    if shared is not None:
        yield from _container_failed(shared["error"], say)
        return
    if _source() == "docker":
        try:
            with container_dsn() as (dsn, container_id):
                say(f"dsn=testcontainers container={container_id}")
                yield dsn
            return
        except Exception as exc:  # any failure to get a container: fall back unless forced
            yield from _container_failed(repr(exc), say)
            return
    say("dsn=embedded")
    yield from _embedded("REGISTRY_TEST_DSN is not set and Docker is not used")


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


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A new database with no schema at all; dropped after the test."""
    name = f"registry_migrate_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_dsn, name)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


TABLES = (
    "workspace_actions",
    "reconcile_steps",
    "reconciles",
    "workspace_events",
    "installed_plugins",
    "declared_plugins",
    "reported_plugins",
    "workspaces",
    "removed_workspaces",
    "fleet_expirations",
    "api_tokens",
    "ui_sessions",
    "plugins_sync_dirty",
)


# Which of TABLES hold rows. A TRUNCATE gives each table, index and sequence it names new files,
# held or empty: of the thirteen, a test leaves rows in a few, and truncating all of them cost
# PostgreSQL about 20-35 ms of CPU per test (most tests start with `db`).
HOLDING_ROWS = "SELECT array_remove(ARRAY[{}], NULL)".format(
    ", ".join(f"CASE WHEN EXISTS (SELECT FROM {table}) THEN '{table}' END" for table in TABLES)
)
# RESTART IDENTITY for the tables not truncated: rows inserted and deleted moved them on too.
RESTART_SEQUENCES = """
SELECT setval(s.seqrelid, s.seqstart, false)
FROM pg_sequence s
JOIN pg_depend d ON d.objid = s.seqrelid AND d.classid = 'pg_class'::regclass
    AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
WHERE d.refobjid = ANY($1::text[]::regclass[])
"""


async def empty_tables(conn: asyncpg.Connection) -> None:
    """TABLES as `TRUNCATE ... RESTART IDENTITY CASCADE` of them all leaves them: locked first
    as that would (waiting for whoever still writes), then only those holding rows truncated."""
    async with conn.transaction():
        await conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE")
        holding = await conn.fetchval(HOLDING_ROWS)
        if holding:
            await conn.execute(f"TRUNCATE {', '.join(holding)} RESTART IDENTITY CASCADE")
        await conn.execute(RESTART_SEQUENCES, list(TABLES))
        # What removed_workspaces' TRUNCATE trigger does, whether or not it was truncated.
        await conn.execute("UPDATE tombstone_count SET n = 0")


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to an emptied test database."""
    conn = await asyncpg.connect(dsn)
    await empty_tables(conn)
    await conn.execute(
        "UPDATE fleet_guard SET holding = false, since = NULL, live = 0, stale = 0, expired = 0,"
        " silence_counted_from = NULL, silent_changed_at = NULL, released_at = NULL,"
        " acked_at = NULL, acked_by = NULL,"
        # Swept just now, as far as the next sweep can tell: a row left from an earlier test
        # would read as an outage (nobody swept for long), and count silence afresh.
        " updated_at = now()"
    )
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
        # Every scrape reads the fleet afresh: tests compare scrapes a moment apart.
        metrics_cache_s=0.0,
        fleet_cache_s=0.0,
    )


MakeRegistry = Callable[..., Awaitable[Registry]]


@pytest.fixture
def make_registry(
    aiohttp_client: AiohttpClient,
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


@pytest.fixture(autouse=True)
def no_registry_outlives_its_test() -> Iterator[None]:
    """A registry left running claims the next tests' reconciles: fail here, and stop it."""
    yield
    left = registry_children()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped by its owner meanwhile
            os.waitpid(pid, 0)
    assert left == [], f"registry processes outlived the test (killed): {left}"


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    """Every process the test starts through it, stopped when the test ends, whatever failed."""
    async with Processes() as owned:
        yield owned


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
