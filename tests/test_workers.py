"""`registry serve --workers N`: N processes on one port, stopped together, failing together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.settings import Settings, SettingsError
from registry.workers import cpu_count
from tests.processes import Processes, RegistryProcess
from tests.support import ADMIN, bearer


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


SCRAPE_TIMEOUT_S = 30.0


async def _scrape(
    registry: RegistryProcess, starting_ok: bool = False
) -> dict[str, dict[str, float]]:
    """{sample name: {worker label (or ""): value summed over the other labels}}; with
    `starting_ok`, nothing while the worker asked is still starting (503)."""
    # A scrape that is never answered must fail here, with its own error and the workers'
    # log, not wait for the test's timeout (seen twice on a loaded machine).
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{registry.url}/metrics") as response,
        ):
            if starting_ok and response.status == 503:
                return {}
            assert response.status == 200
            text = await response.text()
    except TimeoutError:
        raise AssertionError(
            f"/metrics not answered in {SCRAPE_TIMEOUT_S} s:\n{registry.log()[-8000:]}"
        ) from None
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_worker = found.setdefault(sample.name, {})
            worker = sample.labels.get("worker", "")
            by_worker[worker] = by_worker.get(worker, 0.0) + sample.value
    return found


async def _workspace(url: str) -> tuple[str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/workspaces", json={"name": "w"}, headers=ADMIN) as created,
    ):
        assert created.status == 201
        body = await created.json()
    return body["workspace"]["id"], body["token"]


async def _two_workers(dsn: str, tmp_path: Path, processes: Processes) -> RegistryProcess:
    registry = processes.registry(
        dsn,
        tmp_path,
        env={"REGISTRY_WORKERS": "2", "REGISTRY_LOG_FORMAT": "text"},
    )
    # Two processes importing the app at once on a busy machine: a generous bound.
    await registry.wait_healthy(within_s=90)
    # /readyz answered from one worker; the other may still be starting (its stand-in answers
    # 503 meanwhile): until both views are in a scrape.
    deadline = asyncio.get_running_loop().time() + 90
    while (await _scrape(registry, starting_ok=True)).get("registry_worker_up") != {
        "0": 1.0,
        "1": 1.0,
    }:
        assert asyncio.get_running_loop().time() < deadline, registry.log()
        await asyncio.sleep(0.1)
    return registry


async def test_two_workers_serve_one_port_and_both_answer(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, processes: Processes
) -> None:
    registry = await _two_workers(dsn, tmp_path, processes)
    workspace_id, token = await _workspace(registry.url)
    # A new connection per beat: the kernel picks a worker per connection (SO_REUSEPORT).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(60):
            async with session.post(
                f"{registry.url}/registry/heartbeat",
                json={"workspace_id": workspace_id},
                headers=bearer(token),
            ) as beat:
                assert beat.status == 200

    scraped = await _scrape(registry)

    assert scraped["registry_worker_up"] == {"0": 1.0, "1": 1.0}
    pids = {int(pid) for pid in scraped["registry_worker_pid"].values()}
    assert len(pids) == 2
    assert {_parent_of(pid) for pid in pids} == {registry.process.pid}
    beats = scraped["registry_heartbeats_total"]
    assert set(beats) == {"0", "1"} and all(count > 0 for count in beats.values())
    assert sum(beats.values()) == 60
    # Fleet-wide gauges once, unlabelled: summing them over workers would double the fleet.
    assert set(scraped["registry_workspaces"]) == {""}


async def test_sigterm_stops_every_worker_and_loses_no_acknowledged_beat(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, processes: Processes
) -> None:
    registry = await _two_workers(dsn, tmp_path, processes)
    workspace_id, token = await _workspace(registry.url)
    pids = [int(pid) for pid in (await _scrape(registry))["registry_worker_pid"].values()]
    acked: list[int] = []
    answered_by: set[int] = set()

    async def beat_until_refused() -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for tasks in range(1, 100_000):
                try:
                    async with session.post(
                        f"{registry.url}/registry/heartbeat",
                        json={"workspace_id": workspace_id, "active_tasks": tasks},
                        headers=bearer(token),
                    ) as response:
                        if response.status == 200:
                            acked.append(tasks)
                except aiohttp.ClientError:
                    return
                if len(acked) == 50:
                    answered_by.update(_beats_by_worker(await _scrape(registry)))
                await asyncio.sleep(0.002)

    beating = asyncio.ensure_future(beat_until_refused())
    while len(acked) < 60:
        await asyncio.sleep(0.05)
    registry.signal(signal.SIGTERM)
    code = await asyncio.to_thread(registry.process.wait, 40)
    await beating

    stored = await db.fetchval(
        "SELECT active_tasks FROM workspaces WHERE id = $1", uuid.UUID(workspace_id)
    )
    assert code == 0, registry.log()
    assert answered_by == {0, 1}  # the beats were spread over both workers before the stop
    assert not any(_alive(pid) for pid in pids)
    assert stored >= acked[-1]
    assert registry.log().count("registry.startup: stopped") == 2


def _beats_by_worker(scraped: dict[str, dict[str, float]]) -> set[int]:
    return {int(w) for w, n in scraped.get("registry_heartbeats_total", {}).items() if n > 0}


async def test_a_worker_that_dies_takes_the_whole_down(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, processes: Processes
) -> None:
    registry = await _two_workers(dsn, tmp_path, processes)
    pids = {
        worker: int(pid) for worker, pid in (await _scrape(registry))["registry_worker_pid"].items()
    }

    os.kill(pids["1"], signal.SIGKILL)
    code = await asyncio.to_thread(registry.process.wait, 40)

    assert code == 1
    assert not _alive(pids["0"])
    log = registry.log()
    assert f"worker 1 (pid {pids['1']}) exited with status -9; stopping the others" in log
    assert "registry.startup: stopped" in log  # the survivor drained as on SIGTERM


def test_workers_auto_means_one_per_usable_cpu() -> None:
    assert Settings.from_env({"REGISTRY_WORKERS": "auto"}).workers == cpu_count()
    assert Settings.from_env({"REGISTRY_WORKERS": "3"}).workers == 3


def test_workers_must_be_a_positive_count_or_auto() -> None:
    with pytest.raises(SettingsError, match="REGISTRY_WORKERS='0'"):
        Settings.from_env({"REGISTRY_WORKERS": "0"})
    with pytest.raises(SettingsError, match="REGISTRY_WORKERS='many'"):
        Settings.from_env({"REGISTRY_WORKERS": "many"})


async def test_a_port_in_use_is_refused_before_any_worker_starts(
    dsn: str, tmp_path: Path, processes: Processes
) -> None:
    """SO_REUSEPORT alone would let the workers join another listener of the same user."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        registry = processes.registry(
            dsn, tmp_path, env={"REGISTRY_WORKERS": "2", "REGISTRY_PORT": str(port)}
        )
        code = await asyncio.to_thread(registry.process.wait, 30)

    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in registry.log()
    assert "supervising" not in registry.log()


async def test_workers_stop_when_the_supervisor_is_killed(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, processes: Processes
) -> None:
    """SIGKILL leaves the supervisor no chance to stop them: the kernel signals them instead
    (PR_SET_PDEATHSIG), so none keeps the port, its leases and its pools."""
    registry = await _two_workers(dsn, tmp_path, processes)
    pids = [int(pid) for pid in (await _scrape(registry))["registry_worker_pid"].values()]

    registry.signal(signal.SIGKILL)
    registry.process.wait(10)
    deadline = asyncio.get_running_loop().time() + 40
    while any(_alive(pid) for pid in pids):
        assert asyncio.get_running_loop().time() < deadline, registry.log()
        await asyncio.sleep(0.1)

    assert registry.log().count("registry.startup: stopped") == 2  # each drained
