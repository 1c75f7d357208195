"""Crash safety and multi-process behaviour of reconciles: real processes, database and HTTP.

A reconcile is a durable intent (a row) run under a lease. These tests kill a process in the
middle of a run, run two processes on one database through a storm of requests, and pile
requests onto a running reconcile, and check that every intent is run exactly as promised.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from registry.keys import RECONCILER
from registry.plugins import tree_digest
from tests.durability_support import (
    Api,
    active_runs,
    plugin_runtime,
    registry_env,
    registry_processes,
    runs_of,
    stop_all,
    wait_until,
)
from tests.processes import Processes
from tests.support import ADMIN, Registry, Workspace, write_tree

pytestmark = pytest.mark.timeout(90)

PLUGIN_FILES = {"plugin.py": "print('durable')\n", "data/words.txt": "lease\n"}


@pytest.fixture
def plugin_dir(plugin_sources: Path) -> Path:
    return write_tree(plugin_sources / "durable", PLUGIN_FILES)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session)


async def test_sigkill_mid_reconcile_then_restart_completes_the_run(
    dsn: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    plugin_dir: Path,
    api: Api,
    processes: Processes,
) -> None:
    env = registry_env(
        plugin_dir.parent,
        tmp_path,
        reconcile_lease_s=2,
        reconcile_poll_s=0.3,
        reconcile_retry_base_s=0.2,
    )
    async with plugin_runtime(hold_first=1) as runtime:
        (tmp_path / "a").mkdir()
        a = processes.registry(dsn, tmp_path / "a", env)
        b = None
        try:
            await a.wait_healthy()
            workspace = await api.create_workspace(
                a.url, [{"source": f"file://{plugin_dir}"}], delivery="http", url=runtime.url
            )
            beat = await api.heartbeat(a.url, workspace)
            assert (beat["previous_status"], beat["status"]) == ("provisioning", "online")

            # A claims the run and hangs in the delivery: the runtime never answers it.
            await runtime.wait_for_puts(1)
            [run] = await runs_of(db, workspace.id)
            assert (run["status"], run["attempt"]) == ("running", 1), dict(run)
            a.process.kill()
            a.process.wait()

            # The crash state: the run is still running, under the dead process's lease.
            [crashed] = await runs_of(db, workspace.id)
            assert crashed["id"] == run["id"]
            assert crashed["status"] == "running"
            assert crashed["attempt"] == 1
            # Lease owners read host:pid:nonce; this one is the process just killed.
            assert crashed["lease_owner"] == run["lease_owner"]
            assert crashed["lease_owner"].split(":")[1] == str(a.process.pid)
            recorded = await db.fetchval(
                "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1",
                uuid.UUID(workspace.id),
            )
            assert recorded == 0

            (tmp_path / "b").mkdir()
            b = processes.registry(dsn, tmp_path / "b", env)
            await b.wait_healthy()

            async def finished() -> bool:
                return (await runs_of(db, workspace.id))[-1]["status"] in ("succeeded", "failed")

            async def state() -> str:
                runs = [dict(r) for r in await runs_of(db, workspace.id)]
                return f"runs={runs}\nB log:\n{b.log() if b else ''}"

            # Lease 2 s, poll 0.3 s: B takes the run over within a few seconds.
            await wait_until(finished, 15.0, state)
            runs = await runs_of(db, workspace.id)
            # B's delivery answered; A's is still hanging, unanswered.
            puts = [(p.held, p.answered_at is not None) for p in runtime.puts]
        finally:
            a.process.kill()
            a.process.wait()
            await stop_all([b] if b is not None else [])

    assert len(runs) == 1, [dict(r) for r in runs]
    [done] = runs
    assert done["id"] == run["id"]
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    assert done["lease_owner"] is None
    steps = await db.fetch(
        "SELECT attempt, action, status FROM reconcile_steps WHERE reconcile_id = $1", done["id"]
    )
    assert [tuple(s) for s in steps] == [(2, "install", "succeeded")]
    installed = await db.fetch(
        "SELECT name, sha FROM installed_plugins WHERE workspace_id = $1", uuid.UUID(workspace.id)
    )
    assert [tuple(r) for r in installed] == [("durable", tree_digest(plugin_dir))]
    assert puts == [(True, False), (False, True)]
    second = runtime.puts[1]
    assert (second.name, second.sha, second.files) == (
        "durable",
        tree_digest(plugin_dir),
        PLUGIN_FILES,
    )
    assert await active_runs(db) == []


@dataclass
class Request:
    """One thing the storm did to a workspace, with the database's clock before it."""

    kind: str  # flip | manual
    at: datetime
    process: int
    status: int = 200
    run_id: uuid.UUID | None = None
    run_status: str | None = None


WORKSPACES = 8
DRIVERS = 6
STORM_S = 4.0


async def test_two_processes_run_one_reconcile_per_workspace_at_a_time_and_lose_none(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, plugin_dir: Path, api: Api
) -> None:
    env = registry_env(
        plugin_dir.parent,
        tmp_path,
        reconcile_poll_s=0.3,
        reconcile_lease_s=10,
        reconcile_retry_base_s=0.2,
    )
    rng = random.Random(20240611)
    async with (
        plugin_runtime(delay_s=(0.1, 0.2)) as runtime,
        registry_processes(dsn, tmp_path, 2, env) as processes,
        asyncpg.create_pool(dsn, min_size=1, max_size=DRIVERS + 1) as pool,
    ):
        keys = [uuid.uuid4().hex for _ in range(WORKSPACES)]
        workspaces: dict[str, Workspace] = {}
        for index, key in enumerate(keys):
            workspaces[key] = await api.create_workspace(
                processes[index % 2].url,
                [{"source": f"file://{plugin_dir}"}],
                delivery="http",
                url=runtime.workspace_url(key),
            )
        key_of = {w.id: key for key, w in workspaces.items()}
        requests: dict[str, list[Request]] = {w.id: [] for w in workspaces.values()}

        # Every beat reports no plugins: each run then delivers again, so each run is a PUT.
        for index, workspace in enumerate(workspaces.values()):
            beat = await api.heartbeat(processes[index % 2].url, workspace, plugins=[])
            assert beat["status"] == "online"

        async def flip(workspace: Workspace, process: int) -> None:
            at = await pool.fetchval(
                "UPDATE workspaces SET status = 'offline' WHERE id = $1"
                " RETURNING clock_timestamp()",
                uuid.UUID(workspace.id),
            )
            await api.heartbeat(processes[process].url, workspace, plugins=[])
            requests[workspace.id].append(Request("flip", at, process))

        async def manual(workspace: Workspace, process: int) -> None:
            at = await pool.fetchval("SELECT clock_timestamp()")
            status, body = await api.request_reconcile(processes[process].url, workspace)
            if status == 409:  # a flip has it offline this instant
                assert body["error"]["code"] == "workspace_not_live", body
                requests[workspace.id].append(Request("manual", at, process, status))
                return
            assert status in (200, 202), body
            # The run is shown as read after the request committed: a new run may already
            # have been claimed by then.
            run = body["reconcile"]
            requests[workspace.id].append(
                Request("manual", at, process, status, uuid.UUID(run["id"]), run["status"])
            )

        async def driver(seed: int) -> None:
            own = random.Random(seed)
            deadline = time.monotonic() + STORM_S
            while time.monotonic() < deadline:
                workspace = workspaces[own.choice(keys)]
                process = own.randrange(2)
                if own.random() < 0.4:
                    await flip(workspace, process)
                else:
                    await manual(workspace, process)
                await asyncio.sleep(own.uniform(0.0, 0.03))

        await asyncio.gather(*(driver(rng.randrange(1 << 30)) for _ in range(DRIVERS)))

        async def settled() -> bool:
            return not await active_runs(db)

        async def state() -> str:
            logs = "\n".join(p.log()[-4000:] for p in processes)
            return f"active={[dict(r) for r in await active_runs(db)]}\n{logs}"

        await wait_until(settled, 30.0, state)
        for process in processes:
            assert process.process.poll() is None, process.log()
        runs = {w.id: await runs_of(db, w.id) for w in workspaces.values()}
        logs = [p.log() for p in processes]
        installed = {
            w.id: await db.fetch(
                "SELECT name, sha FROM installed_plugins WHERE workspace_id = $1",
                uuid.UUID(w.id),
            )
            for w in workspaces.values()
        }

    # The storm was a storm: both processes took requests of both kinds, and many folded.
    every = [r for rs in requests.values() for r in rs]
    assert {(r.kind, r.process) for r in every} == {
        ("flip", 0),
        ("flip", 1),
        ("manual", 0),
        ("manual", 1),
    }
    assert sum(r.status == 200 for r in every) >= 2 * WORKSPACES
    assert sum(len(rs) for rs in runs.values()) >= 2 * WORKSPACES
    # Both processes ran reconciles (each logs every run it concludes).
    assert all("reconcile succeeded" in log for log in logs), logs

    sha = tree_digest(plugin_dir)
    for workspace_id, workspace_runs in runs.items():
        key = key_of[workspace_id]
        described = [
            (r["status"], r["attempt"], r["started_at"], r["finished_at"], r["error"])
            for r in workspace_runs
        ]
        # Never two deliveries to one workspace at once, seen from the runtime's side ...
        assert runtime.max_in_flight[key] == 1, (key, runtime.max_in_flight)
        # ... every run succeeded, on its first attempt, and none is stuck ...
        assert all(r["status"] == "succeeded" for r in workspace_runs), described
        assert all(r["attempt"] == 1 for r in workspace_runs), described
        # ... and no two runs of the workspace overlap in the database either.
        by_start = sorted(workspace_runs, key=lambda r: r["started_at"])
        for earlier, later in itertools.pairwise(by_start):
            assert earlier["finished_at"] <= later["started_at"], described
        # Each run delivered exactly once: no run was executed twice.
        assert len(runtime.answered(key)) == len(workspace_runs), described
        assert all(p.sha == sha for p in runtime.answered(key))
        assert [tuple(r) for r in installed[workspace_id]] == [("durable", sha)]

        # None lost. A manual request is answered with the run that covers it: that run
        # exists and succeeded. A flip, or a request answered with a run still queued (or a
        # new one), is covered only by a run that started after it was made: the last of those
        # requests must be followed by a run start.
        ids = {r["id"]: r for r in workspace_runs}
        must_follow = []
        for request in requests[workspace_id]:
            if request.run_id is not None:
                assert ids[request.run_id]["status"] == "succeeded", request
            if request.kind == "flip" or request.status == 202 or request.run_status == "queued":
                must_follow.append(request.at)
        if must_follow:
            last_start = max(r["started_at"] for r in workspace_runs)
            assert last_start > max(must_follow), (requests[workspace_id], described)


async def test_reconcile_requests_while_one_runs_fold_into_one_follow_up(
    registry: Registry, plugin_dir: Path
) -> None:
    async with plugin_runtime(hold_first=1) as runtime:
        workspace = await registry.create_workspace(
            [{"source": f"file://{plugin_dir}"}], delivery="http", url=runtime.url
        )
        client = registry.client
        await registry.heartbeat(workspace, plugins=[])
        await runtime.wait_for_puts(1)
        [running] = await registry.reconciles(workspace)
        assert running["status"] == "running"

        async def manual() -> tuple[int, dict[str, Any]]:
            response = await client.post(
                f"/internal/workspaces/{workspace.id}/reconcile",
                json={"refresh": False},
                headers=ADMIN,
            )
            return response.status, (await response.json())["reconcile"]

        async def flip() -> dict[str, Any]:
            await registry.set_status(workspace, "offline")
            return await registry.heartbeat(workspace, plugins=[])

        async def burst(count: int) -> list[tuple[int, dict[str, Any]]]:
            return list(await asyncio.gather(*(manual() for _ in range(count))))

        # Nothing queued yet: requests are answered with the running run, and create nothing.
        before_flip = await burst(3)
        # A flip commits the one follow-up; everything after folds into it.
        flips = [await flip()]
        after_flip = await burst(4)
        for _ in range(3):
            flips.append(await flip())
            after_flip += await burst(1)
        flips.append(await flip())
        runs_while_held = await registry.reconciles(workspace)

        assert len(before_flip) + len(after_flip) == 10
        assert len(flips) == 5
        assert [(code, run["id"], run["status"]) for code, run in before_flip] == [
            (200, str(running["id"]), "running")
        ] * 3
        assert [(f["previous_status"], f["status"]) for f in flips] == [("offline", "online")] * 5
        assert [r["status"] for r in runs_while_held] == ["running", "queued"]
        follow_up = runs_while_held[1]
        assert follow_up["trigger"] == "online_transition"
        assert [(code, run["id"], run["status"]) for code, run in after_flip] == [
            (200, str(follow_up["id"]), "queued")
        ] * 7

        runtime.release()
        runs = await registry.settled(workspace)

    assert [r["id"] for r in runs] == [running["id"], follow_up["id"]]
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"], [r["error"] for r in runs]
    assert runs[0]["finished_at"] <= runs[1]["started_at"]
    assert [p.held for p in runtime.puts] == [True, False]
    # Once nothing is active, a request makes a new run: 202, not 200.
    code, run = await manual()
    assert code == 202
    assert run["id"] not in {str(r["id"]) for r in runs}
    await registry.settled(workspace)


async def test_refresh_requested_while_a_plain_run_runs_gets_a_follow_up(
    registry: Registry, plugin_dir: Path
) -> None:
    async with plugin_runtime(hold_first=1) as runtime:
        workspace = await registry.create_workspace(
            [{"source": f"file://{plugin_dir}"}], delivery="http", url=runtime.url
        )
        await registry.heartbeat(workspace, plugins=[])
        await runtime.wait_for_puts(1)

        response = await registry.client.post(
            f"/internal/workspaces/{workspace.id}/reconcile",
            json={"refresh": True},
            headers=ADMIN,
        )
        body = await response.json()
        runs = await registry.reconciles(workspace)
        runtime.release()

    assert response.status == 202
    assert [(r["status"], r["refresh"]) for r in runs] == [("running", False), ("queued", True)]
    assert body["reconcile"]["id"] == str(runs[1]["id"])


async def test_a_run_whose_lease_was_taken_over_is_stopped_here(
    registry: Registry, plugin_dir: Path
) -> None:
    worker = registry.client.app[RECONCILER]
    async with plugin_runtime(hold_first=1) as runtime:
        workspace = await registry.create_workspace(
            [{"source": f"file://{plugin_dir}"}], delivery="http", url=runtime.url
        )
        await registry.heartbeat(workspace, plugins=[])
        await runtime.wait_for_puts(1)
        [run] = await registry.reconciles(workspace)
        assert run["id"] in worker.running

        # Another process took the run over (this one stalled past its lease).
        await registry.db.execute(
            "UPDATE reconciles SET lease_owner = 'other', lease_expires_at = now() + "
            "interval '1 hour' WHERE id = $1",
            run["id"],
        )

        async def stopped() -> bool:
            return run["id"] not in worker.running

        async def describe() -> str:
            return str(worker.running)

        await wait_until(stopped, 10, describe)
        [after] = await registry.reconciles(workspace)

    assert (after["status"], after["lease_owner"]) == ("running", "other")
    assert after["finished_at"] is None  # the loser wrote nothing
