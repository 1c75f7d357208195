"""Helpers for crash-safety and multi-process reconcile tests.

`PluginRuntime` is a real HTTP server standing in for any number of workspace runtimes: it
serves `PUT /plugins/{name}` and `PUT /ws/{key}/plugins/{name}`, so each workspace can be given
its own URL prefix and told apart. It can hold the first N deliveries until released (a runtime
that hangs), take a while over each delivery, and counts in-flight deliveries per workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.processes import Processes, RegistryProcess
from tests.support import ADMIN, Workspace, bearer

# A held delivery waits this long at most: far longer than any test, shorter than forever.
HOLD_LIMIT_S = 300.0


@dataclass
class Put:
    """One delivery the runtime received (whether or not it has answered yet)."""

    key: str  # the workspace's URL prefix; "" for the bare /plugins route
    name: str
    sha: str
    files: dict[str, str]
    held: bool
    received_at: float
    answered_at: float | None = None


@dataclass
class PluginRuntime:
    hold_first: int = 0  # hold this many deliveries until release() (or HOLD_LIMIT_S)
    delay_s: tuple[float, float] = (0.0, 0.0)  # every other delivery takes this long
    puts: list[Put] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    server: TestServer | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def workspace_url(self, key: str) -> str:
        return f"{self.url}/ws/{key}"

    def answered(self, key: str = "") -> list[Put]:
        return [p for p in self.puts if p.key == key and p.answered_at is not None]

    def release(self) -> None:
        """Let every held delivery (and any later one) answer."""
        self._released.set()

    async def wait_for_puts(self, count: int, within_s: float = 20.0) -> None:
        async with asyncio.timeout(within_s):
            while len(self.puts) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def _put(self, request: web.Request) -> web.Response:
        key = request.match_info.get("key", "")
        body = await request.read()
        self.in_flight[key] += 1
        self.max_in_flight[key] = max(self.max_in_flight[key], self.in_flight[key])
        try:
            held = self.hold_first > 0
            if held:
                self.hold_first -= 1
            put = Put(
                key,
                request.match_info["name"],
                request.headers["X-Plugin-Sha"],
                _untar(body),
                held,
                time.monotonic(),
            )
            self.puts.append(put)
            self._arrived.set()
            if held:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), HOLD_LIMIT_S)
            else:
                low, high = self.delay_s
                await asyncio.sleep(random.uniform(low, high))
            put.answered_at = time.monotonic()
            return web.Response(status=204)
        finally:
            self.in_flight[key] -= 1

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/plugins/{name}", self._put)
        app.router.add_put("/ws/{key}/plugins/{name}", self._put)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        # Held handlers answer first, so the server closes at once and leaves no task behind.
        self.release()
        if self.server is not None:
            await self.server.close()


def _untar(body: bytes) -> dict[str, str]:
    files = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read().decode()
    return files


@contextlib.asynccontextmanager
async def plugin_runtime(**options: Any) -> AsyncIterator[PluginRuntime]:
    runtime = PluginRuntime(**options)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


def registry_env(plugin_sources: Path, work_dir: Path, **settings: object) -> dict[str, str]:
    """REGISTRY_* variables for a subprocess: the test's plugin sources allowlisted."""
    env = {
        "REGISTRY_PLUGIN_ALLOWLIST": f"file://{plugin_sources}/",
        "REGISTRY_PLUGINS_DIR": str(work_dir / "plugins"),
    }
    env.update({f"REGISTRY_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@contextlib.asynccontextmanager
async def registry_processes(
    dsn: str, work_dir: Path, count: int, env: dict[str, str]
) -> AsyncIterator[list[RegistryProcess]]:
    """`count` registry processes on one database, each in its own directory; always stopped."""
    async with Processes() as owned:
        processes: list[RegistryProcess] = []
        for index in range(count):
            own = work_dir / f"registry-{index}"
            own.mkdir(parents=True, exist_ok=True)
            processes.append(owned.registry(dsn, own, env))
        await asyncio.gather(*(p.wait_healthy() for p in processes))
        yield processes


async def stop_all(processes: list[RegistryProcess]) -> None:
    # stop() blocks in wait(): off the loop, so the fake runtime keeps answering meanwhile.
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes))


@dataclass
class Api:
    """The registry's HTTP API as runtimes and operators use it, against any base URL."""

    session: aiohttp.ClientSession

    async def create_workspace(
        self, base: str, plugins: list[dict[str, str]], **fields: Any
    ) -> Workspace:
        # Names are unique among live workspaces: each one gets its own unless the test names it.
        body = {"name": f"agent-{uuid.uuid4().hex[:12]}", "plugins": plugins, **fields}
        async with self.session.post(f"{base}/workspaces", json=body, headers=ADMIN) as response:
            assert response.status == 201, await response.text()
            data = await response.json()
        return Workspace(data["workspace"]["id"], data["token"])

    async def heartbeat(self, base: str, workspace: Workspace, **fields: Any) -> dict[str, Any]:
        async with self.session.post(
            f"{base}/registry/heartbeat",
            json={"workspace_id": workspace.id, **fields},
            headers=bearer(workspace.token),
        ) as response:
            assert response.status == 200, await response.text()
            result: dict[str, Any] = await response.json()
        return result

    async def request_reconcile(
        self, base: str, workspace: Workspace, *, refresh: bool = False
    ) -> tuple[int, dict[str, Any]]:
        async with self.session.post(
            f"{base}/internal/workspaces/{workspace.id}/reconcile",
            json={"refresh": refresh},
            headers=ADMIN,
        ) as response:
            return response.status, await response.json()


async def wait_until(
    check: Callable[[], Awaitable[bool]], within_s: float, what: Callable[[], Awaitable[str]]
) -> None:
    """Poll `check` until it holds; fail with `what()` (a description of the state) if not."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s:g} s: {await what()}")
        await asyncio.sleep(0.05)


async def runs_of(conn: asyncpg.Connection | asyncpg.Pool, workspace_id: str) -> list[Any]:
    return list(
        await conn.fetch(
            "SELECT * FROM reconciles WHERE workspace_id = $1 ORDER BY created_at, id",
            uuid.UUID(workspace_id),
        )
    )


async def active_runs(conn: asyncpg.Connection | asyncpg.Pool) -> list[Any]:
    return list(
        await conn.fetch(
            "SELECT id, workspace_id, status, attempt, lease_owner, lease_expires_at, error"
            " FROM reconciles WHERE status IN ('queued', 'running')"
        )
    )
