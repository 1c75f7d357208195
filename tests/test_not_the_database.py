"""Only errors of database calls count as the database being down (issue 11 item 6, issue 13
item 2): a client that hangs up mid-heartbeat and a full disk while staging a plugin are what
they are, never a "database unavailable" with its 503, its warning and a replaced pool."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from registry.app import create_app
from registry.db.errors import is_unavailable
from registry.errors import FD_EXHAUSTED
from registry.keys import METRICS
from registry.metrics import Metrics
from registry.settings import Settings
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, Workspace, write_tree

RESETS = 20

# Backends of the test database opened since $1, other than the asking one.
NEW_BACKENDS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND pid <> pg_backend_pid() AND backend_start > $1
"""


def app_metrics(registry: Registry) -> Metrics:
    app = registry.client.app
    assert app is not None
    metrics: Metrics = app[METRICS]
    return metrics


async def new_backends(db: asyncpg.Connection, since: datetime) -> int:
    return int(await db.fetchval(NEW_BACKENDS, since))


def heartbeat_counts(metrics: Metrics) -> dict[tuple[str, str], float]:
    """registry_heartbeats_total of kind heartbeat, by (outcome, code)."""
    counts: dict[tuple[str, str], float] = {}
    for family in metrics.heartbeats.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["kind"] == "heartbeat":
                key = (sample.labels["outcome"], sample.labels["code"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


async def hang_up_mid_body(host: str, port: int, workspace: Workspace) -> None:
    """Headers and half the body of a heartbeat, then a TCP reset (SO_LINGER 0)."""
    body = orjson.dumps({"workspace_id": workspace.id, "active_tasks": 1, "current_task": "x"})
    head = (
        "POST /registry/heartbeat HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {workspace.token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    # Long enough for the handler to be waiting for the rest of the body.
    await asyncio.sleep(0.1)
    writer.transport.abort()


@dataclass
class Served:
    """The app behind a real listening socket, as `registry serve` runs it."""

    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture(params=[False, True], ids=["handler-cancellation-off", "handler-cancellation-on"])
async def served(
    request: pytest.FixtureRequest, settings: Settings, dsn: str, db: asyncpg.Connection
) -> AsyncIterator[Served]:
    # Off is how `registry serve` runs (aiohttp's default); on is how its test server runs.
    # The main pool opened in full at start: any backend opened later replaced a connection.
    changed = dataclasses.replace(settings, pool_min_size=10, pool_max_size=10)
    app = create_app(changed, dsn)
    runner = web.AppRunner(app, handler_cancellation=request.param)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, listener).start()
        yield Served(app, "127.0.0.1", listener.getsockname()[1])
    finally:
        await runner.cleanup()
        listener.close()


async def test_a_client_hanging_up_mid_heartbeat_is_not_a_database_outage(
    served: Served, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = served.app[METRICS]
    async with aiohttp.ClientSession(served.url) as http:
        created = await http.post("/workspaces", json={"name": "a"}, headers=ADMIN)
        assert created.status == 201, await created.text()
        data = await created.json()
        workspace = Workspace(data["workspace"]["id"], data["token"])
        beat = {"workspace_id": workspace.id}

        async def beat_and_show() -> None:
            answer = await http.post("/registry/heartbeat", json=beat, headers=workspace.auth)
            assert answer.status == 200, await answer.text()
            shown = await http.get(f"/workspaces/{workspace.id}", headers=ADMIN)
            assert shown.status == 200, await shown.text()

        await beat_and_show()
        since = await db.fetchval("SELECT now()")
        caplog.set_level(logging.DEBUG, logger="registry")

        for _ in range(RESETS):
            await hang_up_mid_body(served.host, served.port, workspace)

        async def all_counted() -> bool:
            for _ in range(100):
                if heartbeat_counts(metrics).get(("client_gone", "499"), 0) >= RESETS:
                    return True
                await asyncio.sleep(0.05)
            return False

        assert await all_counted(), heartbeat_counts(metrics)
        # Both pools still serve, on the connections they had.
        for _ in range(3):
            await beat_and_show()

    counts = heartbeat_counts(metrics)
    assert {key: n for key, n in counts.items() if key[1].startswith("5")} == {}, counts
    assert counts[("client_gone", "499")] == RESETS
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert await new_backends(db, since) == 0


@pytest.fixture
def count_expiries(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every expire_connections() call on any pool, recorded."""
    calls: list[object] = []
    original = asyncpg.pool.Pool.expire_connections

    async def expire(self: asyncpg.Pool) -> None:
        calls.append(self)
        await original(self)

    monkeypatch.setattr(asyncpg.pool.Pool, "expire_connections", expire)
    return calls


async def test_a_full_disk_while_staging_fails_the_step_with_its_own_code(
    make_registry: MakeRegistry,
    plugin_sources: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    count_expiries: list[object],
) -> None:
    registry = await make_registry(reconcile_max_attempts=2)
    plugin = write_tree(plugin_sources / "full-disk", {"plugin.py": "print('x')\n"})
    workspace = await registry.create_workspace([{"source": f"file://{plugin}"}])

    def disk_full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    # A full disk fails first where staging makes its directories.
    monkeypatch.setattr(tempfile, "mkdtemp", disk_full)
    caplog.set_level(logging.INFO, logger="registry")
    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 2)]
    assert "database unavailable" not in runs[0]["error"]
    assert "stage_failed" in runs[0]["error"]
    steps = await registry.db.fetch(
        "SELECT attempt, status, error FROM reconcile_steps WHERE reconcile_id = $1 ORDER BY id",
        runs[0]["id"],
    )
    assert [(s["attempt"], s["status"]) for s in steps] == [(1, "failed"), (2, "failed")]
    assert all(s["error"].startswith("stage_failed: ") for s in steps), steps
    assert "No space left on device" in steps[0]["error"]
    assert count_expiries == []
    assert "database unavailable" not in caplog.text
    installed = await registry.db.fetchval(
        "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1", uuid.UUID(workspace.id)
    )
    assert installed == 0


async def test_a_real_outage_still_counts_and_replaces_only_heartbeat_connections(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, count_expiries: list[object]
) -> None:
    """The other side: a checkout refused as PostgreSQL refuses it is a 503 with Retry-After,
    counted as such in the heartbeat metric, and only the heartbeat pool is expired (the main
    pool's reset tests its connections itself)."""
    workspace = await registry.create_workspace()
    metrics = app_metrics(registry)

    async def refuse(self: object) -> Any:
        # Raised from a real connect attempt, as a stopped PostgreSQL makes it.
        return await asyncpg.connect("postgresql://postgres@127.0.0.1:1/none", timeout=2)

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.pool.PoolAcquireContext, "__aenter__", refuse)
        response = await registry.client.post(
            "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
        )
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        shown = await registry.client.get(f"/workspaces/{workspace.id}", headers=ADMIN)
        assert shown.status == 503

    assert heartbeat_counts(metrics).get(("database_unavailable", "503")) == 1
    assert len(count_expiries) == 1  # the heartbeat pool, once; the admin request none
    await registry.heartbeat(workspace)  # and it recovers by itself


async def test_out_of_file_descriptors_is_not_called_a_database_outage(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_descriptors(self: object) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    FD_EXHAUSTED._last = float("-inf")  # its once-per-interval warning starts afresh

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.pool.PoolAcquireContext, "__aenter__", no_descriptors)
        ready = await registry.client.get("/readyz")

    assert ready.status == 503
    assert ready.headers["Retry-After"] == "1"
    assert (await ready.json())["error"]["code"] == "out_of_file_descriptors"
    assert "database unavailable" not in caplog.text
    assert "out of file descriptors during GET /readyz" in caplog.text
    assert "Too many open files" in caplog.text  # logged as what it is
    assert (await registry.client.get("/readyz")).status == 200


@pytest.mark.parametrize(
    ("error", "checkout", "expected"),
    [
        (ConnectionRefusedError(), True, True),
        (TimeoutError(), True, True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), False, True),
        (asyncpg.exceptions.CannotConnectNowError("starting"), False, True),
        (asyncpg.exceptions.InterfaceError("connection is closed"), False, True),
        # Not the database: a client socket, the disk, descriptors, a bad argument.
        (ConnectionResetError(), False, False),
        (OSError(errno.ENOSPC, "No space left on device"), False, False),
        (TimeoutError(), False, False),
        (OSError(errno.EMFILE, "Too many open files"), True, False),
        (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), False, False),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False, False),
    ],
)
def test_what_counts_as_the_database_being_down(
    error: BaseException, checkout: bool, expected: bool
) -> None:
    assert is_unavailable(error, checkout=checkout) is expected


async def test_what_asyncpg_raised_counts_outside_a_checkout_too(dsn: str) -> None:
    """Without `checkout` an OSError or TimeoutError counts when it came out of asyncpg."""
    with pytest.raises(ConnectionRefusedError) as refused:
        await asyncpg.connect("postgresql://postgres@127.0.0.1:1/none", timeout=5)
    assert is_unavailable(refused.value)
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(TimeoutError) as timed_out:
            await conn.fetchval("SELECT pg_sleep(5)", timeout=0.1)
    finally:
        await conn.close()
    assert is_unavailable(timed_out.value)
