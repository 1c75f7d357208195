"""Database faults: the registry's own PostgreSQL stops under heartbeat load and comes back.

A `python -m registry serve` subprocess runs on a cluster of the test's own. Fifty simulated
workspaces heartbeat through a few concurrent clients, each beat carrying the next value of a
per-workspace `active_tasks` counter, so the test knows exactly what each acknowledged beat
stored. Reconciles are in flight (deliveries the fake runtime takes seconds over) when the
cluster is stopped; it is started again a few seconds later.

The contract (API.md, "503"): while the database is down every heartbeat is answered, quickly,
with 503 and Retry-After, never a 500, never a hang, and the process stays up; afterwards it
recovers by itself, nothing that was acknowledged with 200 is missing, and every reconcile that
was due during the outage still ends succeeded, its plugin recorded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from registry.plugins import tree_digest
from tests.durability_support import Api, plugin_runtime, registry_env
from tests.fault_support import (
    REQUEST_BOUND_S,
    Answer,
    assert_alive,
    get_status,
    heartbeat,
    poll,
)
from tests.pg_cluster import StoppableCluster
from tests.processes import Processes
from tests.support import Workspace, read_tree, write_tree

pytestmark = pytest.mark.timeout(150)

WORKSPACES = 50
CLIENTS = 5
OUTAGE_S = 4.0
IN_FLIGHT_RECONCILES = 4  # flipped online just before the stop; delivered during the outage
AFTER_RECONCILES = 4  # flipped online right after the database is back
PLUGIN_FILES = {"plugin.py": "print('outage')\n", "README": "survives a database restart\n"}


@dataclass
class Beat:
    workspace: str
    active_tasks: int
    sent_at: float
    answer: Answer


async def test_heartbeats_and_reconciles_survive_a_database_outage(
    own_cluster: StoppableCluster, tmp_path: Path, plugin_sources: Path, processes: Processes
) -> None:
    plugin = write_tree(plugin_sources / "outage", PLUGIN_FILES)
    sha = tree_digest(plugin)
    env = registry_env(
        plugin_sources,
        tmp_path,
        reconcile_lease_s=3,
        reconcile_poll_s=0.3,
        reconcile_retry_base_s=0.2,
        reconcile_retry_cap_s=1,
        heartbeat_interval_s=5,
    )
    beats: list[Beat] = []
    counters: Counter[str] = Counter()
    stop_load = asyncio.Event()

    # Every delivery takes seconds: those started just before the stop finish during the
    # outage, when the registry cannot record them.
    async with (
        plugin_runtime(delay_s=(1.5, 2.5)) as runtime,
        aiohttp.ClientSession() as session,
    ):
        process = processes.registry(own_cluster.dsn, tmp_path, env)
        load: list[asyncio.Task[None]] = []
        try:
            await process.wait_healthy()
            api = Api(session)
            fleet = [await api.create_workspace(process.url, []) for _ in range(WORKSPACES)]
            keys = [uuid.uuid4().hex for _ in range(IN_FLIGHT_RECONCILES)]
            in_flight = {
                key: await api.create_workspace(
                    process.url,
                    [{"source": f"file://{plugin}"}],
                    delivery="http",
                    url=runtime.workspace_url(key),
                )
                for key in keys
            }
            after = [
                await api.create_workspace(process.url, [{"source": f"file://{plugin}"}])
                for _ in range(AFTER_RECONCILES)
            ]

            async def client(own: list[Workspace]) -> None:
                while not stop_load.is_set():
                    for workspace in own:
                        counters[workspace.id] += 1
                        tasks = counters[workspace.id]
                        sent = time.monotonic()
                        answer = await heartbeat(
                            session, process.url, workspace, active_tasks=tasks
                        )
                        beats.append(Beat(workspace.id, tasks, sent, answer))
                        await asyncio.sleep(0.01)

            load = [asyncio.create_task(client(fleet[index::CLIENTS])) for index in range(CLIENTS)]
            await asyncio.sleep(1.5)

            # Reconciles due now, whose deliveries are still running when the database goes.
            for workspace in in_flight.values():
                answer = await heartbeat(session, process.url, workspace)
                assert answer.status == 200, answer
                assert answer.body["previous_status"] == "provisioning", answer.body
            await runtime.wait_for_puts(1)

            await asyncio.to_thread(own_cluster.stop)
            down_at = time.monotonic()
            readyz_down = await get_status(session, f"{process.url}/readyz")
            while time.monotonic() - down_at < OUTAGE_S:
                assert_alive(process)
                await asyncio.sleep(0.2)
            await asyncio.to_thread(own_cluster.start)
            up_at = time.monotonic()

            async def ready() -> bool:
                return await get_status(session, f"{process.url}/readyz") == 200

            assert await poll(ready, 30.0), process.log()[-6000:]
            ready_in = time.monotonic() - up_at

            async def beating_again() -> bool:
                return any(b.sent_at > up_at and b.answer.status == 200 for b in beats)

            assert await poll(beating_again, 30.0), process.log()[-6000:]
            beating_in = time.monotonic() - up_at

            # Flips right after recovery start their reconciles as usual.
            for workspace in after:
                answer = await heartbeat(session, process.url, workspace)
                assert answer.status == 200, answer
                assert answer.body["previous_status"] == "provisioning", answer.body

            await asyncio.sleep(1.5)
            stop_load.set()
            await asyncio.gather(*load)
            assert_alive(process)

            conn = await asyncpg.connect(own_cluster.dsn)
            try:
                watched = [*in_flight.values(), *after]
                ids = [uuid.UUID(w.id) for w in watched]

                async def settled() -> bool:
                    active: int = await conn.fetchval(
                        "SELECT count(*) FROM reconciles WHERE workspace_id = ANY($1::uuid[])"
                        " AND status IN ('queued', 'running')",
                        ids,
                    )
                    return active == 0

                settled_ok = await poll(settled, 40.0, 0.2)
                stored = {
                    str(r["id"]): r["active_tasks"]
                    for r in await conn.fetch("SELECT id, active_tasks FROM workspaces")
                }
                runs = {
                    w.id: [
                        dict(r)
                        for r in await conn.fetch(
                            "SELECT id, status, attempt, error, started_at, finished_at"
                            " FROM reconciles WHERE workspace_id = $1 ORDER BY created_at, id",
                            uuid.UUID(w.id),
                        )
                    ]
                    for w in watched
                }
                installed = {
                    w.id: [
                        tuple(r)
                        for r in await conn.fetch(
                            "SELECT name, sha FROM installed_plugins WHERE workspace_id = $1",
                            uuid.UUID(w.id),
                        )
                    ]
                    for w in watched
                }
            finally:
                await conn.close()
            log = process.log()
            assert_alive(process)
        finally:
            stop_load.set()
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            await asyncio.to_thread(process.stop)

    # The registry kept answering: only 200s and 503s, every 503 with Retry-After and the
    # database_unavailable code, none took long, and there were plenty of each.
    answered = Counter(b.answer.status for b in beats)
    unanswered = [b.answer.error for b in beats if b.answer.status is None]
    assert unanswered == [], (unanswered[:5], log[-6000:])
    assert set(answered) <= {200, 503}, (answered, log[-6000:])
    assert answered[503] >= WORKSPACES, answered
    assert answered[200] >= 2 * WORKSPACES, answered
    unavailable = [b.answer for b in beats if b.answer.status == 503]
    assert all(a.headers.get("Retry-After") for a in unavailable)
    assert {a.error_code for a in unavailable} == {"database_unavailable"}
    slowest = max(b.answer.seconds for b in beats)
    assert slowest < REQUEST_BOUND_S, slowest
    assert readyz_down == 503
    assert "unhandled error" not in log, log[-6000:]
    # Recovered by itself, within seconds.
    assert ready_in < 30 and beating_in < 30, (ready_in, beating_in)

    # Nothing acknowledged is missing: per workspace, beats are sent one after another, so
    # the stored value is at least the last one answered 200 (a beat answered 503 while its
    # transaction committed may make it larger, never more than the last sent).
    for workspace in fleet:
        acked = [b.active_tasks for b in beats if b.workspace == workspace.id]
        last_ok = max(
            (
                b.active_tasks
                for b in beats
                if b.workspace == workspace.id and b.answer.status == 200
            ),
            default=0,
        )
        assert last_ok > 0, workspace
        assert last_ok <= stored[workspace.id] <= max(acked), (
            workspace.id,
            last_ok,
            stored[workspace.id],
        )

    # Every reconcile due during the outage, and every one started right after, completed.
    assert settled_ok, (runs, log[-6000:])
    for workspace_id, workspace_runs in runs.items():
        assert workspace_runs, workspace_id
        assert workspace_runs[-1]["status"] == "succeeded", (workspace_runs, log[-6000:])
        assert installed[workspace_id] == [("outage", sha)], (workspace_runs, installed)
    # The outage did catch deliveries mid-run: their first attempt could not be recorded, and
    # the run was taken over once its lease lapsed.
    assert any(runs[w.id][-1]["attempt"] >= 2 for w in in_flight.values()), runs
    for key in keys:
        assert any(p.sha == sha for p in runtime.answered(key)), key
        assert runtime.max_in_flight[key] == 1, (key, runtime.max_in_flight)
    for workspace in after:
        assert read_tree(tmp_path / "plugins" / workspace.id / "outage") == PLUGIN_FILES
