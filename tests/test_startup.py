"""Start-up: `registry serve` listens at once and answers 503 `starting` until it is ready.

The process tests hold the migration advisory lock from another connection (migrations wait
for it, as they would behind another replica) or point the registry at a port where nothing
listens yet, then open a proxy to the real server there. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

import registry.app as app_module
import registry.db.pool
from registry.app import create_app
from registry.db.errors import DatabaseUnavailable
from registry.db.migrate import MIGRATION_LOCK_KEY, migrate
from registry.errors import STARTING_RETRY_AFTER_S
from registry.settings import Settings
from registry.startup import RETRY_BASE_S, RETRY_CAP_S, stand_in, start_up
from tests.conftest import with_database
from tests.processes import Processes, RegistryProcess, free_port
from tests.support import ADMIN, bearer

# Generous bounds: they only have to end a test that would otherwise hang.
START_WITHIN_S = 20.0
# Long enough for the backoff to reach its cap and try again after the proxy opens.
RECOVER_WITHIN_S = 30.0


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: Any


async def ask(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> Answer | None:
    """One exchange; None when nothing answers on the port."""
    try:
        async with session.request(
            method, url, timeout=aiohttp.ClientTimeout(total=5), **kwargs
        ) as response:
            raw = await response.read()
            body = await response.json(content_type=None) if raw else None
            return Answer(response.status, CIMultiDict(response.headers), body)
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_for(
    check: Callable[[], Awaitable[bool]], within_s: float, what: Callable[[], str]
) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.1)


async def wait_status(
    session: aiohttp.ClientSession,
    process: RegistryProcess,
    path: str,
    status: int,
    within_s: float,
) -> None:
    async def answered() -> bool:
        assert process.process.poll() is None, f"registry exited:\n{process.log()}"
        found = await ask(session, "GET", f"{process.url}{path}")
        return found is not None and found.status == status

    await wait_for(answered, within_s, lambda: f"{path} never answered {status}:\n{process.log()}")


def assert_starting(answer: Answer | None, *, head: bool = False) -> None:
    assert answer is not None, "nothing answered"
    assert answer.status == 503, answer
    assert answer.headers["Retry-After"] == str(STARTING_RETRY_AFTER_S)
    assert answer.headers["X-Request-Id"]
    if head:
        assert answer.body is None
        return
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.body["error"]["code"] == "starting", answer.body
    assert answer.body["error"]["message"]


@pytest.fixture
async def fresh_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of the test's own, not migrated: the registry under test migrates it."""
    name = f"registry_startup_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def migration_lock(dsn: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold the migrations' advisory lock, as a replica migrating would; yields `release`."""
    holder = await asyncpg.connect(dsn)
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)

    async def release() -> None:
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

    try:
        yield release
    finally:
        await holder.close()


async def waiting_for_lock(dsn: str) -> bool:
    """Whether some session waits for the migration lock (the registry's migrate)."""
    conn = await asyncpg.connect(dsn)
    try:
        waiting: bool = await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return waiting
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running(dsn: str, tmp_path: Path) -> AsyncIterator[RegistryProcess]:
    async with Processes() as owned:
        yield owned.registry(dsn, tmp_path, {"REGISTRY_LOG_FORMAT": "text"})


async def test_answers_503_starting_until_migrations_are_done_then_serves(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        migration_lock(fresh_dsn) as release,
        running(fresh_dsn, tmp_path) as process,
        aiohttp.ClientSession() as session,
    ):
        base = process.url
        await wait_status(session, process, "/healthz", 200, START_WITHIN_S)

        async def blocked() -> bool:
            return await waiting_for_lock(fresh_dsn)

        # Still starting for sure: its migrations wait for the lock this test holds.
        await wait_for(blocked, START_WITHIN_S, process.log)
        health = await ask(session, "GET", f"{base}/healthz")
        build = await ask(session, "GET", f"{base}/buildinfo")
        head_health = await ask(session, "HEAD", f"{base}/healthz")
        ready = await ask(session, "GET", f"{base}/readyz")
        head_ready = await ask(session, "HEAD", f"{base}/readyz")
        metrics = await ask(session, "GET", f"{base}/metrics")
        beat = await ask(
            session,
            "POST",
            f"{base}/registry/heartbeat",
            json={"workspace_id": str(uuid.uuid4())},
            headers=bearer("rwt_whatever"),
        )
        listing = await ask(session, "GET", f"{base}/workspaces", headers=ADMIN)
        no_token = await ask(session, "POST", f"{base}/workspaces", json={"name": "w"})

        await release()
        await wait_status(session, process, "/readyz", 200, START_WITHIN_S)
        created = await ask(
            session, "POST", f"{base}/workspaces", json={"name": "w"}, headers=ADMIN
        )
        assert created is not None and created.status == 201, created
        served = await ask(
            session,
            "POST",
            f"{base}/registry/heartbeat",
            json={"workspace_id": created.body["workspace"]["id"]},
            headers=bearer(created.body["token"]),
        )
        code = await asyncio.to_thread(process.stop)

    assert code == 0, process.log()
    assert health is not None and (health.status, health.body) == (200, {"status": "ok"})
    assert build is not None and build.status == 200
    assert head_health is not None and head_health.status == 200
    for answer in (ready, metrics, beat, listing, no_token):
        assert_starting(answer)
    assert_starting(head_ready, head=True)
    assert served is not None and served.status == 200, served
    assert served.body["previous_status"] == "provisioning"
    assert "Traceback" not in process.log()


@contextlib.asynccontextmanager
async def proxy_to(server_dsn: str, port: int) -> AsyncIterator[None]:
    """Open 127.0.0.1:`port` and pipe every connection to the server behind `server_dsn`."""
    parts = urlsplit(server_dsn)
    socket_dir = parse_qs(parts.query).get("host", [None])[0]

    async def upstream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if parts.hostname:
            return await asyncio.open_connection(parts.hostname, parts.port or 5432)
        assert socket_dir, f"cannot tell where {server_dsn} listens"
        return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    pipes: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await upstream()
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            pipes.add(asyncio.ensure_future(task))

    server = await asyncio.start_server(connected, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


def proxied_dsn(database_dsn: str, port: int) -> str:
    parts = urlsplit(database_dsn)
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    return f"postgresql://{user}{password}@127.0.0.1:{port}{parts.path}"


def attempts(log: str) -> int:
    return len(re.findall(r"database unreachable \(attempt \d+", log))


async def test_waits_for_an_unreachable_database_with_backoff_then_serves(
    server_dsn: str, fresh_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    async with (
        running(proxied_dsn(fresh_dsn, port), tmp_path) as process,
        aiohttp.ClientSession() as session,
    ):
        started = time.monotonic()
        await wait_status(session, process, "/healthz", 200, START_WITHIN_S)

        async def retried() -> bool:
            return attempts(process.log()) >= 2

        await wait_for(retried, START_WITHIN_S, process.log)
        ready = await ask(session, "GET", f"{process.url}/readyz")
        listing = await ask(session, "GET", f"{process.url}/workspaces", headers=ADMIN)
        async with proxy_to(server_dsn, port):
            await wait_status(session, process, "/readyz", 200, RECOVER_WITHIN_S)
            waited = time.monotonic() - started
            created = await ask(
                session, "POST", f"{process.url}/workspaces", json={"name": "w"}, headers=ADMIN
            )
            code = await asyncio.to_thread(process.stop)

    assert code == 0, process.log()
    assert_starting(ready)
    assert_starting(listing)
    assert created is not None and created.status == 201, created
    log = process.log()
    # Capped backoff, not a hot loop: attempt n comes after RETRY_BASE_S * (2**(n-1) - 1) s,
    # then one per RETRY_CAP_S; a slower machine only makes fewer attempts.
    doubling = 1
    while RETRY_BASE_S * 2**doubling < RETRY_CAP_S:
        doubling += 1
    ramp_s = RETRY_BASE_S * (2**doubling - 1)
    assert attempts(log) <= doubling + 1 + max(0.0, waited - ramp_s) / RETRY_CAP_S, log
    assert "WARNING" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("held_by", ["migration lock", "unreachable database"])
async def test_sigterm_during_start_up_exits_cleanly_and_promptly(
    fresh_dsn: str, tmp_path: Path, held_by: str
) -> None:
    dsn = fresh_dsn if held_by == "migration lock" else proxied_dsn(fresh_dsn, free_port())
    async with (
        migration_lock(fresh_dsn),
        running(dsn, tmp_path) as process,
        aiohttp.ClientSession() as session,
    ):
        await wait_status(session, process, "/healthz", 200, START_WITHIN_S)

        async def stuck() -> bool:
            if held_by == "migration lock":
                return await waiting_for_lock(fresh_dsn)
            return attempts(process.log()) >= 1

        await wait_for(stuck, START_WITHIN_S, process.log)
        process.signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = await asyncio.to_thread(process.process.wait, 15)
        took = time.monotonic() - stopped
        # The cancelled migration let go of its connection: nobody waits for the lock now.
        still_waiting = await waiting_for_lock(fresh_dsn)

    assert code == 0, process.log()
    assert took < 5, process.log()
    assert not still_waiting
    assert "Traceback" not in process.log()


async def test_a_migration_failure_ends_the_process_instead_of_503s_forever(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        migration_lock(fresh_dsn) as release,
        running(fresh_dsn, tmp_path) as process,
        aiohttp.ClientSession() as session,
    ):
        await wait_status(session, process, "/readyz", 503, START_WITHIN_S)
        # While it waits, the schema turns out to be from a newer registry: not retriable.
        conn = await asyncpg.connect(fresh_dsn)
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 'x')")
        await conn.close()
        await release()
        code = await asyncio.to_thread(process.process.wait, START_WITHIN_S)

    log = process.log()
    assert code == 2, log
    assert "registry: database has migration 9999 (future)" in log
    assert "Traceback" not in log


# In-process: the stand-in, and the app's own start-up when a pool cannot be opened.


async def test_the_stand_in_answers_every_path_and_method_with_starting() -> None:
    async with TestClient(TestServer(stand_in())) as client:
        answers = {
            (method, path): await client.request(method, path)
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE")
            for path in ("/readyz", "/metrics", "/registry/register", "/no/such/path")
        }
        health = await client.get("/healthz", headers={"X-Request-Id": "probe-1"})
        assert (health.status, await health.json()) == (200, {"status": "ok"})
        assert health.headers["X-Request-Id"] == "probe-1"
        for (method, path), response in answers.items():
            raw = await response.read()
            body = await response.json() if raw else None
            assert response.status == 503, (method, path)
            assert_starting(
                Answer(response.status, CIMultiDict(response.headers), body), head=method == "HEAD"
            )


async def test_when_the_heartbeat_pool_cannot_be_opened_the_first_pool_is_closed(
    settings: Settings, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[asyncpg.Pool] = []
    real_create_pool = registry.db.pool.create_pool

    async def create_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
        pool = await real_create_pool(settings, dsn)
        opened.append(pool)
        return pool

    async def refused(settings: Settings, dsn: str) -> asyncpg.Pool:
        raise ConnectionRefusedError("the database went away")

    monkeypatch.setattr(app_module, "create_pool", create_pool)
    monkeypatch.setattr(app_module, "create_heartbeat_pool", refused)
    server = TestServer(create_app(settings, dsn))

    with pytest.raises(ConnectionRefusedError):
        await server.start_server()
    await server.close()

    assert len(opened) == 1
    assert opened[0].is_closing()


async def test_a_pool_that_cannot_be_opened_yet_is_retried_with_a_fresh_app(
    settings: Settings,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    opened: list[asyncpg.Pool] = []
    # What opening a pool raises when the database refuses (db/pool.py classifies it).
    refusals = [DatabaseUnavailable("ConnectionRefusedError: the database is restarting")]
    real_create_pool = registry.db.pool.create_pool
    real_heartbeat_pool = registry.db.pool.create_heartbeat_pool

    async def create_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
        pool = await real_create_pool(settings, dsn)
        opened.append(pool)
        return pool

    async def create_heartbeat_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
        if refusals:
            raise refusals.pop()
        return await real_heartbeat_pool(settings, dsn)

    monkeypatch.setattr(app_module, "create_pool", create_pool)
    monkeypatch.setattr(app_module, "create_heartbeat_pool", create_heartbeat_pool)

    runner = await start_up(settings, dsn)
    try:
        first, second = opened
        assert first.is_closing()
        assert not second.is_closing()
        async with second.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await runner.cleanup()

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("opening the pools: database unreachable (attempt 1" in w for w in warnings)


async def test_start_up_warns_about_a_table_autovacuum_cannot_reach_and_starts_anyway(
    settings: Settings,
    empty_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A database of its own: the storage option must not leak into other tests' tables.
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("ALTER TABLE fleet_guard SET (autovacuum_enabled = false)")
    finally:
        await conn.close()

    runner = await start_up(settings, empty_dsn)
    await runner.cleanup()

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if "table fleet_guard has autovacuum_enabled = false" in w]
