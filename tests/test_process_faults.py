"""Process faults: registry processes are SIGKILLed at random moments under load.

Two `python -m registry serve` processes share one database (and one plugins directory); a
fake runtime receives every plugin delivery over HTTP, each workspace under its own URL prefix,
and counts concurrent deliveries per workspace. Drivers flip workspaces offline → online (an
offline write plus a heartbeat, to whichever process is up) and request manual reconciles,
while the test repeatedly kills one of the two processes (waiting until it holds a running
reconcile, so the kill lands mid-run) and starts a replacement; the other keeps serving.

Afterwards, with a 2 s lease so dead processes' runs are taken over quickly:
- no lost transition: every flip left exactly one offline → online event, and each
  workspace's status events form one unbroken chain ending in its current status;
- no lost reconcile: every flip, and every manual request answered with a new or queued run,
  is followed by a succeeded run that started after it;
- no doubled reconcile: no two runs of one workspace overlap, and the runtime never saw two
  deliveries for one workspace at once;
- nothing stuck: every run is terminal (succeeded).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from registry.plugins import tree_digest
from tests.durability_support import (
    Api,
    active_runs,
    plugin_runtime,
    registry_env,
    runs_of,
    stop_all,
    wait_until,
)
from tests.fault_support import (
    assert_alive,
    chain_breaks,
    heartbeat,
    request_reconcile,
    set_offline,
    status_events,
)
from tests.processes import Processes, RegistryProcess
from tests.support import Workspace, write_tree

pytestmark = pytest.mark.timeout(150)

WORKSPACES = 8
DRIVERS = 4
KILLS = 5
PLUGIN_FILES = {"plugin.py": "print('crash')\n"}


@dataclass
class Flip:
    at: datetime  # the database's clock when the workspace went offline
    previous_status: str  # as the heartbeat that answered 200 reported it
    retried: bool  # an earlier beat of this flip got no answer (its process was killed)


@dataclass
class Manual:
    at: datetime
    status: int
    run_id: uuid.UUID | None
    run_status: str | None


class Fleet:
    """Two process slots; a slot being killed or restarted takes no requests."""

    def __init__(self, dsn: str, work_dir: Path, env: dict[str, str], processes: Processes) -> None:
        self._processes = processes
        self._dsn = dsn
        self._work_dir = work_dir
        self._env = env
        self.slots: list[RegistryProcess | None] = [None, None]
        self.started: list[RegistryProcess] = []
        self._generation = itertools.count()

    async def start(self, slot: int) -> None:
        own = self._work_dir / f"registry-{slot}-{next(self._generation)}"
        own.mkdir(parents=True)
        process = self._processes.registry(self._dsn, own, self._env)
        self.started.append(process)
        await process.wait_healthy()
        self.slots[slot] = process

    async def kill(self, slot: int) -> RegistryProcess:
        process = self.slots[slot]
        assert process is not None
        self.slots[slot] = None
        process.process.kill()
        await asyncio.to_thread(process.process.wait)
        return process

    def live(self, rng: random.Random) -> RegistryProcess:
        up = [p for p in self.slots if p is not None]
        assert up, "no registry process is up"
        return rng.choice(up)

    def current(self) -> list[RegistryProcess]:
        return [p for p in self.slots if p is not None]


async def test_sigkilled_processes_lose_and_double_no_transition_and_no_reconcile(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, plugin_sources: Path, processes: Processes
) -> None:
    plugin = write_tree(plugin_sources / "crash", PLUGIN_FILES)
    sha = tree_digest(plugin)
    env = registry_env(
        plugin_sources,
        tmp_path,  # one plugins directory for every process
        reconcile_lease_s=2,
        reconcile_poll_s=0.3,
        reconcile_retry_base_s=0.2,
        reconcile_retry_cap_s=1,
        heartbeat_interval_s=5,
    )
    rng = random.Random(0x5EED)
    fleet = Fleet(dsn, tmp_path, env, processes)
    flips: dict[str, list[Flip]] = {}
    manuals: dict[str, list[Manual]] = {}
    unexpected: list[str] = []
    kills: list[str] = []
    stop_drivers = asyncio.Event()
    drivers: list[asyncio.Task[None]] = []

    async with (
        plugin_runtime(delay_s=(0.05, 0.25)) as runtime,
        aiohttp.ClientSession() as session,
        asyncpg.create_pool(dsn, min_size=1, max_size=DRIVERS + 2) as pool,
    ):
        try:
            await asyncio.gather(fleet.start(0), fleet.start(1))
            api = Api(session)
            keys = [uuid.uuid4().hex for _ in range(WORKSPACES)]
            workspaces: dict[str, Workspace] = {}
            for key in keys:
                workspaces[key] = await api.create_workspace(
                    fleet.live(rng).url,
                    [{"source": f"file://{plugin}"}],
                    delivery="http",
                    url=runtime.workspace_url(key),
                )
            key_of = {w.id: key for key, w in workspaces.items()}
            locks = {w.id: asyncio.Lock() for w in workspaces.values()}
            flips.update({w.id: [] for w in workspaces.values()})
            manuals.update({w.id: [] for w in workspaces.values()})

            async def beat_until_answered(workspace: Workspace, own: random.Random) -> Any:
                """Heartbeat (no plugins observed: every run delivers) until a process answers;
                (body, whether an earlier beat went unanswered)."""
                retried = False
                deadline = time.monotonic() + 30
                while True:
                    answer = await heartbeat(session, fleet.live(own).url, workspace, plugins=[])
                    if answer.status == 200:
                        return answer.body, retried
                    if answer.status is not None:
                        unexpected.append(f"heartbeat {answer.status}: {answer.body}")
                    assert time.monotonic() < deadline, answer
                    retried = True
                    await asyncio.sleep(0.05)

            # First heartbeats: provisioning → online, each one a flip with a reconcile.
            for workspace in workspaces.values():
                at = await pool.fetchval("SELECT clock_timestamp()")
                body, retried = await beat_until_answered(workspace, rng)
                assert body["previous_status"] == "provisioning", body
                flips[workspace.id].append(Flip(at, "provisioning", retried))

            async def flip(workspace: Workspace, own: random.Random) -> None:
                async with locks[workspace.id]:
                    at = await set_offline(pool, workspace.id)
                    assert at is not None, "a workspace the drivers own was not live"
                    body, retried = await beat_until_answered(workspace, own)
                    if not retried:
                        assert body["previous_status"] == "offline", body
                    flips[workspace.id].append(Flip(at, body["previous_status"], retried))

            async def manual(workspace: Workspace, own: random.Random) -> None:
                at = await pool.fetchval("SELECT clock_timestamp()")
                answer = await request_reconcile(session, fleet.live(own).url, workspace)
                if answer.status is None:
                    return  # its process was killed: nothing was promised
                if answer.status == 409 and answer.error_code == "workspace_not_live":
                    manuals[workspace.id].append(Manual(at, 409, None, None))
                    return
                if answer.status not in (200, 202):
                    unexpected.append(f"reconcile request {answer.status}: {answer.body}")
                    return
                run = answer.body["reconcile"]
                manuals[workspace.id].append(
                    Manual(at, answer.status, uuid.UUID(run["id"]), run["status"])
                )

            async def driver(seed: int) -> None:
                own = random.Random(seed)
                while not stop_drivers.is_set():
                    workspace = workspaces[own.choice(keys)]
                    if own.random() < 0.4:
                        await flip(workspace, own)
                    else:
                        await manual(workspace, own)
                    await asyncio.sleep(own.uniform(0.02, 0.1))

            drivers = [asyncio.create_task(driver(rng.randrange(1 << 30))) for _ in range(DRIVERS)]

            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                slot = rng.randrange(2)
                victim = fleet.slots[slot]
                assert victim is not None

                async def holds_a_run(victim: RegistryProcess = victim) -> bool:
                    owners = await pool.fetch(
                        "SELECT lease_owner FROM reconciles WHERE status = 'running'"
                    )
                    pid = str(victim.process.pid)
                    return any(r["lease_owner"].split(":")[1] == pid for r in owners)

                deadline = time.monotonic() + 3
                while not await holds_a_run() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(rng.uniform(0.0, 0.1))
                killed = await fleet.kill(slot)
                kills.append(f"slot {slot} pid {killed.process.pid}")
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                await fleet.start(slot)

            await asyncio.sleep(1.0)
            stop_drivers.set()
            await asyncio.gather(*drivers)

            async def settled() -> bool:
                return not await active_runs(db)

            async def state() -> str:
                logs = "\n".join(p.log()[-3000:] for p in fleet.current())
                return f"active={[dict(r) for r in await active_runs(db)]}\n{logs}"

            await wait_until(settled, 40.0, state)
            for process in fleet.current():
                assert_alive(process)
            runs = {w.id: await runs_of(db, w.id) for w in workspaces.values()}
            events = {w.id: await status_events(db, w.id) for w in workspaces.values()}
            current = {
                str(r["id"]): r["status"]
                for r in await db.fetch("SELECT id, status FROM workspaces")
            }
            installed = {
                w.id: [
                    tuple(r)
                    for r in await db.fetch(
                        "SELECT name, sha FROM installed_plugins WHERE workspace_id = $1",
                        uuid.UUID(w.id),
                    )
                ]
                for w in workspaces.values()
            }
            logs = "\n".join(p.log()[-3000:] for p in fleet.current())
        finally:
            stop_drivers.set()
            for task in drivers:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            await stop_all(fleet.current())
            for process in fleet.started:
                if process.process.poll() is None:
                    process.process.kill()
                    process.process.wait()

    assert len(kills) == KILLS
    assert unexpected == [], unexpected
    # The workload was a workload: many flips and requests, some flips answered only after
    # their first beat died with its process, and kills that landed mid-run (taken over).
    assert sum(len(f) for f in flips.values()) >= 2 * WORKSPACES
    assert sum(len(m) for m in manuals.values()) >= 2 * WORKSPACES
    every_run = [r for rs in runs.values() for r in rs]
    assert any(r["attempt"] >= 2 for r in every_run), "no kill landed mid-run"

    for workspace_id, workspace_runs in runs.items():
        key = key_of[workspace_id]
        described = [
            (r["id"], r["trigger"], r["status"], r["attempt"], r["started_at"], r["finished_at"])
            for r in workspace_runs
        ]
        # No lost transition: one offline → online event per flip, by a heartbeat, and one
        # offline write per flip after the first; the chain has no gap.
        status_chain = events[workspace_id]
        assert chain_breaks(status_chain, current[workspace_id]) == [], status_chain
        comebacks = [
            e
            for e in status_chain
            if (e["from_status"], e["to_status"])
            == (
                "offline",
                "online",
            )
        ]
        assert len(comebacks) == len(flips[workspace_id]) - 1, (status_chain, flips[workspace_id])
        assert all(e["cause"] == "heartbeat" for e in comebacks), comebacks
        firsts = [e for e in status_chain if e["from_status"] == "provisioning"]
        assert [(e["to_status"], e["cause"]) for e in firsts] == [("online", "heartbeat")]

        # Nothing stuck, nothing failed.
        assert all(r["status"] == "succeeded" for r in workspace_runs), (described, logs)
        assert all(r["lease_owner"] is None for r in workspace_runs), described
        # No doubled reconcile: runs of one workspace never overlap, in the database or at
        # the runtime.
        by_start = sorted(workspace_runs, key=lambda r: r["started_at"])
        for earlier, later in itertools.pairwise(by_start):
            assert earlier["finished_at"] <= later["started_at"], described
        assert runtime.max_in_flight[key] == 1, (key, runtime.max_in_flight)
        # Each run delivered (the runtime reports no plugins, so every run installs).
        assert len(runtime.answered(key)) >= len(workspace_runs), described
        assert all(p.sha == sha for p in runtime.answered(key))
        assert installed[workspace_id] == [("crash", sha)]

        # No lost reconcile: every flip, and every request answered with a new or a still
        # queued run, is followed by a succeeded run that started after it; a request answered
        # with a running run is covered by that run, which succeeded.
        starts = [r["started_at"] for r in workspace_runs if r["status"] == "succeeded"]
        ids = {r["id"]: r for r in workspace_runs}
        for made in flips[workspace_id]:
            assert any(s > made.at for s in starts), (made, described)
        for request in manuals[workspace_id]:
            if request.run_id is None:
                continue
            assert ids[request.run_id]["status"] == "succeeded", (request, described)
            if request.status == 202 or request.run_status == "queued":
                assert any(s > request.at for s in starts), (request, described)
