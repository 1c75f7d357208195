"""The reference runtime client against the real registry (real HTTP, real PostgreSQL).

Time is the test's: the client sleeps through an injected function that either parks until the
test lets it make its next request (`Stepper`) or advances a fake clock at once (`FakeTime`),
so nothing here waits for real seconds or depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from registry.plugins import tree_digest
from registry.runtime_client import (
    Action,
    ClientConfig,
    ObservedPlugin,
    Outcome,
    RuntimeClient,
    plugins_in,
    token_file,
)
from registry.settings import Settings
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, Workspace, make_git_repo, write_tree

AioHttpServer = Callable[[web.Application], Awaitable[TestServer]]
GUARD_S = 30.0  # only a guard against a hang; no assertion depends on it


class Stepper:
    """A sleep the test releases one request at a time; the client parks in it after each."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._parked: asyncio.Queue[float] = asyncio.Queue()
        self._go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self._parked.put_nowait(delay)
        await self._go.get()

    async def parked(self) -> float:
        """Wait until the client has handled an answer; the delay it chose after it."""
        return await asyncio.wait_for(self._parked.get(), GUARD_S)

    def release(self) -> None:
        self._go.put_nowait(None)

    async def step(self) -> float:
        """Let the client make its next request and handle the answer."""
        self.release()
        return await self.parked()


class FakeTime:
    """A clock that sleeping advances at once; parks for good at `horizon` or `max_sleeps`."""

    def __init__(self, horizon: float = float("inf"), max_sleeps: int | None = None) -> None:
        self.now = 0.0
        self.horizon = horizon
        self.max_sleeps = max_sleeps
        self.delays: list[float] = []
        self.parked = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        if self.now >= self.horizon or len(self.delays) == self.max_sleeps:
            self.parked.set()
            await asyncio.Event().wait()  # until stop() cancels the pause
        await asyncio.sleep(0)


def registry_url(registry: Registry) -> str:
    return str(registry.client.make_url("/"))


def plugin_source(plugin_sources: Path, name: str) -> str:
    return f"file://{write_tree(plugin_sources / name, {'plugin.py': f'NAME = {name!r}'})}"


async def pending_actions(db: asyncpg.Connection, workspace: Workspace) -> list[str]:
    rows = await db.fetch(
        "SELECT id FROM workspace_actions WHERE workspace_id = $1 AND acked_at IS NULL",
        uuid.UUID(workspace.id),
    )
    return [str(r["id"]) for r in rows]


async def booted(registry: Registry, workspace: Workspace, stepper: Stepper) -> None:
    """The client registered (workspace online) and the reconcile it started is done."""
    await stepper.parked()
    assert (await registry.show(workspace))["status"] == "online"
    await registry.settled(workspace)


# --------------------------------------------------------------------------- first boot


async def test_first_boot_goes_online_installs_plugins_and_acks_the_restart(
    registry: Registry, plugin_sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = await registry.create_workspace([{"source": plugin_source(plugin_sources, "seo")}])
    restarts: list[Action] = []

    async def restart(action: Action) -> None:
        restarts.append(action)

    stepper = Stepper()
    config = ClientConfig(
        registry_url(registry),
        workspace.id,
        plugins_dir=registry.settings.resolved_plugins_dir / workspace.id,
    )
    client = RuntimeClient(
        config,
        lambda: workspace.token,
        restart_hook=restart,
        extra_fields=lambda: {"is_busy": False},
        sleep=stepper.sleep,
        rand=lambda: 0.5,  # the middle of the client's own jitter: the delay is the answer's
    )
    with caplog.at_level(logging.INFO, logger="registry.runtime_client"):
        async with client:
            await booted(registry, workspace, stepper)
            assert (
                registry.settings.resolved_plugins_dir / workspace.id / "seo" / "plugin.py"
            ).exists()

            # First beat: reports the plugin it sees, is asked to restart, runs the hook.
            delay = await stepper.step()
            assert [a.type for a in restarts] == ["restart"]
            assert await pending_actions(registry.db, workspace) == [restarts[0].id]
            assert 27.0 <= delay <= 33.0  # next_heartbeat_s: 30 s ± the registry's 10%

            # Second beat carries the ack.
            await stepper.step()

    assert await pending_actions(registry.db, workspace) == []
    assert client.counters.restarts == 1
    assert client.counters.acked == 1
    shown = await registry.show(workspace)
    installed = {p["name"]: p["sha"] for p in shown["installed_plugins"]}
    # The digest the client computed is the one the registry recorded: one shared function.
    assert shown["observed_plugins"] == [{"name": "seo", "sha": installed["seo"]}]
    assert shown["plugins_sync"] == "synced"
    # The client's own line (the registry's registry.tolerance line is captured too when an
    # earlier test left that logger at INFO).
    ignored = [
        r
        for r in caplog.records
        if r.name == "registry.runtime_client" and "is_busy" in r.getMessage()
    ]
    assert len(ignored) == 1  # two answers named it; logged once


async def test_an_action_is_acked_only_after_its_hook_succeeded(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await registry.create_workspace([{"source": plugin_source(plugin_sources, "seo")}])
    calls: list[str] = []

    async def restart(action: Action) -> None:
        calls.append(action.id)
        if len(calls) == 1:
            raise RuntimeError("could not restart yet")

    stepper = Stepper()
    config = ClientConfig(registry_url(registry), workspace.id)
    client = RuntimeClient(
        config, lambda: workspace.token, restart_hook=restart, sleep=stepper.sleep
    )
    async with client:
        await booted(registry, workspace, stepper)
        await stepper.step()  # the hook fails: nothing to ack
        await stepper.step()  # no ack sent; the action is repeated and the hook succeeds
        assert len(await pending_actions(registry.db, workspace)) == 1
        await stepper.step()  # now the ack goes out
    assert len(calls) == 2 and calls[0] == calls[1]
    assert await pending_actions(registry.db, workspace) == []
    assert client.counters.restart_failures == 1


async def test_it_registers_then_beats_at_the_answered_interval_with_jitter(
    aiohttp_server: AioHttpServer,
) -> None:
    """A stand-in registry records what the client sends and asks for a beat every 10 s."""
    time = FakeTime(max_sleeps=4)
    seen: list[tuple[str, dict[str, Any]]] = []
    workspace_id = str(uuid.uuid4())

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.match_info["kind"], await request.json()))
        return web.json_response(
            {"workspace_id": workspace_id, "status": "online", "next_heartbeat_s": 10}
        )

    app = web.Application()
    app.router.add_post("/registry/{kind}", answer)
    server = await aiohttp_server(app)
    draws = iter([0.0, 1.0, 0.5, 0.5])
    config = ClientConfig(
        str(server.make_url("/")), workspace_id, url="http://10.0.0.7:9000", agent_card={"n": 1}
    )
    client = RuntimeClient(
        config,
        lambda: "t",
        clock=time,
        sleep=time.sleep,
        rand=lambda: next(draws),
    )
    time.now = 100.0  # the client started at 0: uptime is measured from its own start
    async with client:
        await asyncio.wait_for(time.parked.wait(), GUARD_S)

    kinds = [kind for kind, _ in seen]
    assert kinds == ["register", "heartbeat", "heartbeat", "heartbeat"]
    assert seen[0][1] == {
        "workspace_id": workspace_id,
        "url": "http://10.0.0.7:9000",
        "agent_card": {"n": 1},
    }
    assert [body["uptime_seconds"] for _, body in seen[1:]] == [109.0, 120.0, 130.0]
    assert seen[1][1]["acks"] == []
    # 10 s stretched or shrunk by up to 10%: a fleet that started together drifts apart.
    assert time.delays == pytest.approx([9.0, 11.0, 10.0, 10.0])


# --------------------------------------------------------------------------- outages


async def test_a_503_outage_is_ridden_out_without_a_request_storm(
    registry: Registry, aiohttp_server: AioHttpServer
) -> None:
    """A stand-in in front of the registry answers 503 + Retry-After: 5 for 120 s of fake
    time, then passes requests through to the real registry."""
    workspace = await registry.create_workspace()
    time = FakeTime(horizon=200.0)
    outage_end = 120.0
    during: list[float] = []

    async def front(request: web.Request) -> web.StreamResponse:
        if time.now < outage_end:
            during.append(time.now)
            return web.json_response(
                {"error": {"code": "database_unavailable", "message": "down"}},
                status=503,
                headers={"Retry-After": "5"},
            )
        upstream = await registry.client.post(
            request.path, data=await request.read(), headers=dict(request.headers)
        )
        return web.Response(
            status=upstream.status, body=await upstream.read(), content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/registry/{kind}", front)
    server = await aiohttp_server(app)
    config = ClientConfig(str(server.make_url("/")), workspace.id)
    client = RuntimeClient(
        config, lambda: workspace.token, clock=time, sleep=time.sleep, rand=lambda: 0.5
    )
    async with client:
        await asyncio.wait_for(time.parked.wait(), GUARD_S)

    # Retry-After is a floor for every retry, and the backoff grows past it.
    outage_delays = time.delays[: len(during)]
    assert all(d >= 5.0 for d in outage_delays)
    assert max(outage_delays) > 5.0
    assert len(during) <= outage_end / 5.0
    assert client.counters.unavailable == len(during)
    # Recovered: registered and beating through the stand-in once the outage ended.
    assert client.counters.beats_ok >= 2
    assert (await registry.show(workspace))["status"] == "online"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _refused_delays(rand: float) -> list[float]:
    time = FakeTime(max_sleeps=9)
    config = ClientConfig(
        f"http://127.0.0.1:{closed_port()}",
        str(uuid.uuid4()),
        min_delay_s=1.0,
        backoff_base_s=1.0,
        backoff_cap_s=30.0,
    )
    client = RuntimeClient(config, lambda: "t", clock=time, sleep=time.sleep, rand=lambda: rand)
    async with client:
        await asyncio.wait_for(time.parked.wait(), GUARD_S)
    assert client.counters.connection_errors == client.counters.requests == 9
    return time.delays


async def test_connection_refused_backs_off_exponentially_up_to_the_cap() -> None:
    # The highest draw of the full jitter shows the ceiling itself.
    assert await _refused_delays(1.0) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    # The lowest draw never goes below the minimum delay: no hot loop, whatever the dice say.
    assert await _refused_delays(0.0) == [1.0] * 9


# --------------------------------------------------------------------------- token and removal


async def test_after_token_rotation_the_client_rereads_its_token_and_continues(
    make_registry: MakeRegistry, settings: Settings, tmp_path: Path
) -> None:
    # A grace period of 0 makes the old token fail at once, as for a leak.
    registry = await make_registry(token_rotation_grace_s=0.0)
    workspace = await registry.create_workspace()
    path = tmp_path / "token"
    path.write_text(workspace.token + "\n")
    stepper = Stepper()
    config = ClientConfig(registry_url(registry), workspace.id, min_delay_s=1.0)
    client = RuntimeClient(config, token_file(path), sleep=stepper.sleep)
    async with client:
        await stepper.parked()
        await stepper.step()
        assert client.counters.beats_ok == 2

        response = await registry.client.post(f"/workspaces/{workspace.id}/token", headers=ADMIN)
        assert response.status == 200, await response.text()
        new_token = (await response.json())["token"]

        # The file still holds the old token: re-read, unchanged, so it backs off.
        await stepper.step()
        assert (client.counters.refused, client.counters.token_reloads) == (1, 0)

        # The new token lands in the file: the next 401 picks it up and retries soon.
        path.write_text(new_token + "\n")
        assert await stepper.step() == 1.0
        assert (client.counters.refused, client.counters.token_reloads) == (2, 1)

        await stepper.step()
        assert client.counters.beats_ok == 3


async def test_during_the_grace_period_the_client_moves_to_the_new_token_without_a_401(
    registry: Registry, tmp_path: Path
) -> None:
    workspace = await registry.create_workspace()
    path = tmp_path / "token"
    path.write_text(workspace.token + "\n")
    stepper = Stepper()
    config = ClientConfig(registry_url(registry), workspace.id)
    client = RuntimeClient(config, token_file(path), sleep=stepper.sleep)
    async with client:
        await stepper.parked()
        response = await registry.client.post(f"/workspaces/{workspace.id}/token", headers=ADMIN)
        new_token = (await response.json())["token"]
        path.write_text(new_token + "\n")

        await stepper.step()  # answered with token_rotated: the client re-reads the file
        await stepper.step()  # sent with the new token
        previous_used_at = await registry.db.fetchval(
            "SELECT previous_token_used_at FROM workspaces WHERE id = $1",
            uuid.UUID(workspace.id),
        )
        # The grace period ends: the old token would be refused now, the client is not.
        await registry.db.execute(
            "UPDATE workspaces SET previous_token_valid_until = now() WHERE id = $1",
            uuid.UUID(workspace.id),
        )
        await stepper.step()

    assert client.counters.token_reloads == 1
    assert client.counters.refused == 0
    assert previous_used_at is not None  # the first beat after the rotation used the old one
    assert client.counters.beats_ok == 4


async def test_a_removed_workspace_stops_the_client(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    stepper = Stepper()
    removed: list[bool] = []

    async def on_removed() -> None:
        removed.append(True)
        await client.stop()  # a runtime shutting itself down from the hook must not deadlock

    config = ClientConfig(registry_url(registry), workspace.id)
    client = RuntimeClient(
        config, lambda: workspace.token, on_removed=on_removed, sleep=stepper.sleep
    )
    async with client:
        await stepper.parked()
        response = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)
        assert response.status == 204
        stepper.release()
        assert await asyncio.wait_for(client.done(), GUARD_S) is Outcome.REMOVED
        requests = client.counters.requests
    assert removed == [True]
    assert requests == 2  # register, then the one heartbeat that got 410; nothing after


# --------------------------------------------------------------------------- small parts


def test_plugins_in_reports_each_plugin_and_skips_staging_areas(tmp_path: Path) -> None:
    write_tree(tmp_path / "b", {"x.py": "1"})
    write_tree(tmp_path / "a", {"y.py": "2"})
    write_tree(tmp_path / ".staging-123", {"new/x.py": "1"})
    (tmp_path / "notes.txt").write_text("not a plugin")
    assert plugins_in(tmp_path) == [
        ObservedPlugin("a", tree_digest(tmp_path / "a")),
        ObservedPlugin("b", tree_digest(tmp_path / "b")),
    ]
    assert plugins_in(tmp_path / "missing") == []


def test_a_config_that_could_hot_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="min_delay_s"):
        ClientConfig("http://registry", str(uuid.uuid4()), min_delay_s=0.0)


def test_the_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, registry.runtime_client as _; "
        "print(sorted(m for m in ('asyncpg', 'aiojobs', 'orjson', 'prometheus_client', "
        "'registry.app', 'registry.db') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_git_plugin_reported_from_its_directory_is_converged(
    registry: Registry, plugin_sources: Path
) -> None:
    make_git_repo(plugin_sources / "gitplug", {"plugin.py": "X = 1"})
    source = f"git+file://{plugin_sources / 'gitplug'}#main"
    workspace = await registry.create_workspace([{"source": source}])
    stepper = Stepper()
    plugins_dir = registry.settings.resolved_plugins_dir / workspace.id
    config = ClientConfig(registry_url(registry), workspace.id, plugins_dir=plugins_dir)
    client = RuntimeClient(config, lambda: workspace.token, sleep=stepper.sleep)
    async with client:
        await booted(registry, workspace, stepper)
        await stepper.step()  # reports the plugin directory it sees
    response = await registry.client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", json={}, headers=ADMIN
    )
    assert response.status == 202, await response.text()
    runs = await registry.settled(workspace)
    steps = await registry.db.fetch(
        "SELECT action FROM reconcile_steps WHERE reconcile_id = $1", runs[-1]["id"]
    )
    assert [r["action"] for r in steps] == ["skip"]
    # Converged on disk; synced once the runtime acknowledged the restart that loads it.
    shown = await registry.show(workspace)
    acks = [a["id"] for a in shown["pending_actions"]]
    await registry.heartbeat(workspace, acks=acks, plugins=shown["observed_plugins"])
    assert (await registry.show(workspace))["plugins_sync"] == "synced"
