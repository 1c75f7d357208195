"""The operator CLI end to end: `python -m registry <command>` against a real registry process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from registry.cli import main
from tests.processes import Processes, RegistryProcess, free_port
from tests.support import ADMIN, ADMIN_TOKEN, bearer, write_tree

WAIT_S = 30.0


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(url: str | None, token: str | None) -> dict[str, str]:
    # Nothing from the developer's own REGISTRY_* settings leaks into what is tested.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    if url is not None:
        env["REGISTRY_URL"] = url
    if token is not None:
        env["REGISTRY_ADMIN_TOKEN"] = token
    return env


async def spawn(url: str | None, *args: str, token: str | None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry",
        *args,
        env=cli_env(url, token),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Ctrl-C must reach the CLI as in a terminal, even when the test run was started in
        # the background, where SIGINT is ignored and children inherit that.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def cli(url: str | None, *args: str, token: str | None = ADMIN_TOKEN) -> Result:
    process = await spawn(url, *args, token=token)
    try:
        out, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def ok(url: str, *args: str) -> Result:
    result = await cli(url, *args)
    assert result.code == 0, result
    assert "Traceback" not in result.err, result.err
    return result


def registry_env(plugin_sources: Path, **extra: str) -> dict[str, str]:
    return {
        "REGISTRY_PLUGIN_ALLOWLIST": f"file://{plugin_sources}/",
        "REGISTRY_RECONCILE_POLL_S": "0.2",
        # Retries a tenth of a second apart, not the default 2 s doubling: a failed run still
        # goes through every attempt before the CLI reports it, in well under a second.
        "REGISTRY_RECONCILE_RETRY_BASE_S": "0.05",
        "REGISTRY_RECONCILE_RETRY_CAP_S": "0.5",
        **extra,
    }


@pytest.fixture
async def registry_process(
    db: asyncpg.Connection, dsn: str, tmp_path: Path, plugin_sources: Path, processes: Processes
) -> RegistryProcess:
    process = processes.registry(dsn, tmp_path, env=registry_env(plugin_sources))
    await process.wait_healthy()
    return process


@pytest.fixture
def url(registry_process: RegistryProcess) -> str:
    return registry_process.url


async def heartbeat(url: str, workspace_id: str, token: str, **fields: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/registry/heartbeat",
            json={"workspace_id": workspace_id, **fields},
            headers=bearer(token),
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def create(url: str, name: str, *extra: str) -> tuple[str, str]:
    created = (await ok(url, "workspaces", "create", name, "--json", *extra)).json()
    return created["workspace"]["id"], created["token"]


async def test_a_workspace_from_creation_to_removal(
    url: str, tmp_path: Path, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "seo-all", {"plugin.json": "{}", "run.py": "print(1)\n"})

    created = await ok(url, "workspaces", "create", "seo-agent", "--plugin", f"file://{plugin}")

    assert "seo-agent" in created.out
    assert "shown only this once" in created.out
    token = next(line.split()[1] for line in created.out.splitlines() if line.startswith("token"))
    workspace_id = next(
        line.split()[1] for line in created.out.splitlines() if line.startswith("id")
    )

    listed = await ok(url, "workspaces", "list")
    assert listed.out.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    row = next(line for line in listed.out.splitlines() if line.startswith(workspace_id))
    assert row.split()[1:3] == ["seo-agent", "provisioning"]

    shown = await ok(url, "workspaces", "show", workspace_id)
    assert "waiting for the runtime's first heartbeat" in shown.out
    assert f"seo-all  file://{plugin}" in shown.out

    beat = await heartbeat(url, workspace_id, token)
    assert beat["previous_status"] == "provisioning"

    reconciled = await ok(url, "reconcile", workspace_id)
    assert "succeeded" in reconciled.out
    step = next(line for line in reconciled.out.splitlines() if "seo-all" in line)
    assert step.split()[1:3] in (["install", "succeeded"], ["skip", "skipped"])
    assert "succeeded" in reconciled.err.splitlines()[-1]  # progress, on stderr
    assert (tmp_path / "data" / "plugins" / workspace_id / "seo-all" / "run.py").is_file()

    again = (await ok(url, "reconcile", workspace_id, "--json")).json()
    assert again["status"] == "succeeded"
    assert [(s["plugin"], s["action"]) for s in again["steps"]] == [("seo-all", "skip")]

    # Installed but not loaded until the runtime restarts: the restart is pending.
    pending = await ok(url, "workspaces", "show", workspace_id)
    assert "restart" in pending.out.split("pending actions:")[1].splitlines()[2]
    actions = (await heartbeat(url, workspace_id, token))["actions"]
    await heartbeat(url, workspace_id, token, acks=[a["id"] for a in actions])

    shown = await ok(url, "workspaces", "show", workspace_id)
    lines = shown.out.splitlines()
    assert next(line for line in lines if line.startswith("status")).split()[1] == "online"
    assert next(line for line in lines if line.startswith("plugins sync")).split()[2] == "synced"
    assert "last reconcile:" in shown.out
    view = (await ok(url, "workspaces", "show", workspace_id, "--json")).json()
    assert view["installed_plugins"][0]["name"] == "seo-all"

    assert "is paused" in (await ok(url, "workspaces", "pause", workspace_id)).out
    resumed = (await ok(url, "workspaces", "resume", "--json", workspace_id)).json()
    assert resumed["status"] == "offline"
    assert "is removed" in (await ok(url, "workspaces", "delete", workspace_id)).out
    assert (await ok(url, "--json", "workspaces", "show", workspace_id)).json()["status"] == (
        "removed"
    )

    history = ""

    async def history_complete() -> bool:
        # Events become readable once the registry has numbered them (a moment after commit).
        nonlocal history
        history = (await ok(url, "events", "--workspace", workspace_id)).out
        return "offline -> removed" in history

    await eventually(history_complete)
    assert "-> provisioning" in history
    assert "provisioning -> online" in history
    assert "online -> paused" in history
    assert "reconcile_succeeded" in history
    events = (await ok(url, "events", "--workspace", workspace_id, "--json")).json()["events"]
    assert [e["to"] for e in events if e["kind"] == "status"] == [
        "provisioning",
        "online",
        "paused",
        "offline",
        "removed",
    ]
    first = events[0]["id"]
    later = (
        await ok(url, "events", "--workspace", workspace_id, "--after", str(first), "--json")
    ).json()["events"]
    assert later == events[1:]


async def test_list_pages_with_a_cursor_or_all(url: str) -> None:
    ids = [(await create(url, f"agent-{n}"))[0] for n in range(3)]

    page = await ok(url, "workspaces", "list", "--limit", "2")
    rows = page.out.splitlines()[1:]

    assert [row.split()[0] for row in rows] == sorted(ids)[:2]
    assert "--cursor" in page.err
    everything = (await ok(url, "workspaces", "list", "--limit", "2", "--all", "--json")).json()
    assert sorted(w["id"] for w in everything["workspaces"]) == sorted(ids)
    assert everything["next_cursor"] is None
    online = (await ok(url, "workspaces", "list", "--status", "online", "--json")).json()
    assert online["workspaces"] == []


async def test_reconcile_no_wait_prints_the_queued_run(url: str) -> None:
    workspace_id, token = await create(url, "w")
    await heartbeat(url, workspace_id, token)

    run = (await ok(url, "reconcile", workspace_id, "--no-wait", "--json")).json()

    assert run["workspace_id"] == workspace_id
    assert run["status"] in ("queued", "running", "succeeded")


async def test_a_failed_reconcile_exits_1_and_shows_why(url: str, plugin_sources: Path) -> None:
    plugin = write_tree(plugin_sources / "vanishing", {"plugin.json": "{}"})
    workspace_id, token = await create(url, "broken", "--plugin", f"file://{plugin}")
    (plugin / "plugin.json").unlink()
    plugin.rmdir()
    await heartbeat(url, workspace_id, token)

    result = await cli(url, "reconcile", workspace_id)

    assert result.code == 1, result
    assert "Traceback" not in result.err
    lines = result.out.splitlines()
    assert next(line for line in lines if line.startswith("status")).split()[1] == "failed"
    # The fast retries shorten the waits only: the run still used every attempt (default 5).
    assert next(line for line in lines if line.startswith("attempt")).split()[1] == "5"
    step = next(line for line in lines if line.lstrip().startswith("vanishing"))
    assert step.split()[1:3] == ["install", "failed"]
    shown = await ok(url, "workspaces", "show", workspace_id)
    assert "last reconcile failed" in shown.out


async def read_line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), WAIT_S)
    assert line, "the stream ended"
    return line.decode()


async def stop_follower(follower: asyncio.subprocess.Process) -> str:
    """Ctrl-C, as an operator would; returns what was left on stderr."""
    if follower.returncode is None:
        follower.send_signal(signal.SIGINT)
    try:
        _, err = await asyncio.wait_for(follower.communicate(), WAIT_S)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    return err.decode()


async def next_event_for(follower: asyncio.subprocess.Process, workspace_id: str) -> Any:
    while True:
        event = json.loads(await read_line(follower.stdout))
        if event["workspace_id"] == workspace_id:
            return event


async def test_events_follow_prints_changes_as_they_happen(url: str, processes: Processes) -> None:
    workspace_id, _ = await create(url, "watched")
    follower = processes.adopt(await spawn(url, "events", "--follow", "--json", token=ADMIN_TOKEN))
    try:
        assert "following events" in await read_line(follower.stderr)

        await ok(url, "workspaces", "pause", workspace_id)

        event = await next_event_for(follower, workspace_id)
        assert (event["kind"], event["from"], event["to"]) == ("status", "provisioning", "paused")
    finally:
        err = await stop_follower(follower)
    assert follower.returncode == 0
    assert "Traceback" not in err


async def test_events_follow_resumes_after_the_stream_drops(
    db: asyncpg.Connection, dsn: str, tmp_path: Path, plugin_sources: Path, processes: Processes
) -> None:
    # Three registries and a follower, all the fixture's: a failure anywhere stops every one.
    port = free_port()
    env = registry_env(plugin_sources, REGISTRY_PORT=str(port))

    def on_the_same_port() -> RegistryProcess:
        process = processes.registry(dsn, tmp_path, env=env)
        process.url = f"http://127.0.0.1:{port}"  # start_registry names the port it picked
        return process

    first = on_the_same_port()
    other = processes.registry(dsn, tmp_path, env=registry_env(plugin_sources))
    await first.wait_healthy()
    await other.wait_healthy()
    workspace_id, _ = await create(first.url, "resumed")
    follower = processes.adopt(
        await spawn(first.url, "events", "--follow", "--json", token=ADMIN_TOKEN)
    )
    assert "following events" in await read_line(follower.stderr)
    await ok(first.url, "workspaces", "pause", workspace_id)
    assert (await next_event_for(follower, workspace_id))["to"] == "paused"

    assert first.stop() == 0
    # Changed while the follower is cut off: only Last-Event-ID brings it back.
    await ok(other.url, "workspaces", "resume", workspace_id)
    replacement = on_the_same_port()
    await replacement.wait_healthy()

    event = await next_event_for(follower, workspace_id)
    assert (event["from"], event["to"]) == ("paused", "offline")
    assert "reconnecting" in await read_line(follower.stderr)
    await stop_follower(follower)


async def test_api_errors_are_one_line_with_the_code_and_their_exit_code(url: str) -> None:
    unknown = str(uuid.uuid4())

    shown = await cli(url, "workspaces", "show", unknown)

    assert shown.code == 3  # not found
    assert shown.out == ""
    assert shown.err == f"registry: 404 workspace_not_found: no workspace {unknown}\n"
    workspace_id, _ = await create(url, "still-provisioning")
    refused = await cli(url, "reconcile", workspace_id)
    assert refused.code == 4  # conflict
    assert refused.err.startswith("registry: 409 workspace_not_live: ")
    wrong_token = await cli(url, "workspaces", "list", token="not-the-admin-token-at-all")
    assert wrong_token.code == 1
    assert wrong_token.err.startswith("registry: 401 ")
    resumed = await cli(url, "workspaces", "resume", workspace_id)
    assert (resumed.code, resumed.err.split(":")[1]) == (4, " 409 not_paused")


async def test_a_missing_token_is_a_usage_error() -> None:
    result = await cli("http://127.0.0.1:9", "workspaces", "list", token=None)

    assert result.code == 2
    assert "REGISTRY_ADMIN_TOKEN" in result.err
    assert "Traceback" not in result.err


async def test_a_registry_that_is_not_there_is_a_clear_error() -> None:
    result = await cli(f"http://127.0.0.1:{free_port()}", "workspaces", "list")

    assert result.code == 5  # unavailable
    assert "cannot reach the registry" in result.err
    assert "connection refused" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["workspaces", "show", " "],
        ["events", "--limit", "0"],
        ["workspaces", "list", "--limit", "0"],
        ["reconcile"],
        ["reconcile", "history"],
        ["wait", str(uuid.uuid4()), "--for", "status=sideways"],
        ["wait", str(uuid.uuid4()), "--for", "status=online", "--timeout", "soon"],
        ["workspaces", "list", "-o", "yaml"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["--token", "t", *argv])
    except SystemExit as exited:  # argparse's own usage errors
        code = exited.code  # type: ignore[assignment]

    assert code == 2
    assert capsys.readouterr().err.startswith(("usage:", "registry: "))


def test_the_registry_url_flag_works_before_and_after_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    for argv in (
        ["--url", f"http://127.0.0.1:{port}", "workspaces", "list"],
        ["workspaces", "list", "--url", f"http://127.0.0.1:{port}"],
        ["workspaces", "create", "w", "--registry-url", f"http://127.0.0.1:{port}"],
    ):
        assert main(["--token", "t", *argv]) == 5
        assert f"127.0.0.1:{port}: connection refused" in capsys.readouterr().err


async def test_admin_routes_still_answer_the_test_helpers(url: str) -> None:
    # The CLI's JSON is the API's JSON: what it prints for a workspace is what the API serves.
    workspace_id, _ = await create(url, "same")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/workspaces/{workspace_id}", headers=ADMIN) as response,
    ):
        direct = await response.json()
    printed = (await ok(url, "workspaces", "show", workspace_id, "--json")).json()
    direct["why"] = printed["why"] = None  # "created N s ago" moves on
    assert printed == direct


async def test_tokens_are_made_listed_used_and_revoked_from_the_cli(
    url: str, db: asyncpg.Connection
) -> None:
    made = await ok(url, "tokens", "create", "oncall", "--role", "operate", "--json")
    secret = made.json()["secret"]
    assert "shown only this once" in made.err
    reader = (await ok(url, "tokens", "create", "dash", "--role", "read", "--json")).json()
    workspace_id, _ = await create(url, "tokened")

    listed = await ok(url, "tokens", "list")
    paused = await cli(url, "workspaces", "pause", workspace_id, token=secret)
    refused = await cli(url, "workspaces", "resume", workspace_id, token=reader["secret"])
    revoked = await ok(url, "tokens", "revoke", "oncall")
    after = await cli(url, "workspaces", "list", token=secret)

    assert secret not in listed.out
    assert [line.split()[:2] for line in listed.out.splitlines()] == [
        ["NAME", "ROLE"],
        ["dash", "read"],
        ["oncall", "operate"],
    ]
    assert paused.code == 0, paused
    actor = await db.fetchval(
        "SELECT actor FROM workspace_events WHERE cause = 'paused' AND workspace_id = $1",
        uuid.UUID(workspace_id),
    )
    assert actor == "oncall"
    assert refused.code == 1
    assert refused.err.startswith("registry: 403 role_required: this route needs the operate")
    assert revoked.out == "token oncall revoked\n"
    assert (after.code, after.err.split(":")[1]) == (1, " 401 token_revoked")
    with_revoked = (await ok(url, "tokens", "list", "--include-revoked", "--json")).json()
    assert sorted(t["name"] for t in with_revoked["tokens"]) == ["dash", "oncall"]
    # The history names who acted; an audit event shows what it was given.
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{url}/workspaces/{workspace_id}/plugins", json={"plugins": []}, headers=ADMIN
        ) as response,
    ):
        assert response.status == 200, await response.text()
    history = (await ok(url, "events", "--workspace", workspace_id)).out.splitlines()
    paused_line = next(line for line in history if " paused " in line)
    assert "oncall" in paused_line.split()
    audit_line = next(line for line in history if "plugins_set" in line)
    assert audit_line.split()[-3:] == ["plugins_set", "admin", "plugins=[]"]


async def test_fleet_guard_ack_from_the_cli(url: str, db: asyncpg.Connection) -> None:
    secret = (await ok(url, "tokens", "create", "pager", "--role", "operate", "--json")).json()
    not_holding = await cli(url, "fleet", "guard", "ack", token=secret["secret"])
    await db.execute("UPDATE fleet_guard SET holding = true, since = now()")

    acked = await cli(url, "fleet", "guard", "ack", token=secret["secret"])

    assert (not_holding.code, not_holding.err.split(":")[1]) == (4, " 409 guard_not_holding")
    assert acked.code == 0, acked
    assert "acknowledged by pager" in acked.out
    assert await db.fetchval("SELECT acked_by FROM fleet_guard") == "pager"
