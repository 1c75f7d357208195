"""Soak: a converged fleet stays converged, and the registry's memory and connections stay flat.

Thirty simulated workspace runtimes heartbeat a `python -m registry serve` subprocess on a
short interval. Each declares one file:// plugin (filesystem delivery). A runtime reports the
plugins it loaded at its last restart (the digest of its plugin directory, which by then also
holds generated `__pycache__` files), acknowledges every restart action, and is "restarted"
once, after its first install. Once the fleet has converged, workspaces flip offline at random:
written offline in the database, or gone silent until the liveness sweeper takes them offline
(REGISTRY_OFFLINE_AFTER_S is short); their next heartbeat brings them back online, which
starts a reconcile. Manual reconcile requests come in too.

After convergence: no heartbeat answer carries a restart action, no workspace_actions row is
added, every reconcile is a no-op (skip steps only) that succeeded, and the registry process's
RSS and its number of server connections do not grow beyond a tolerance.

The normal suite soaks for about 20 s. For a long soak, set REGISTRY_SOAK_S (seconds):

    REGISTRY_SOAK_S=600 .venv/bin/pytest -q tests/test_soak.py
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from registry.plugins import tree_digest
from tests.durability_support import Api, active_runs, registry_env
from tests.fault_support import (
    assert_alive,
    heartbeat,
    poll,
    request_reconcile,
    rss_kib,
    server_connections,
    set_offline,
)
from tests.processes import Processes
from tests.support import Workspace, write_tree

SOAK_S = float(os.environ.get("REGISTRY_SOAK_S") or 20)
WORKSPACES = 30
POOL_MAX = 8
HEARTBEAT_IN_FLIGHT = 2  # the heartbeat pool's maximum: one connection per batch in flight
# Every server connection the registry may hold: both pools full, and its LISTEN connection.
CONNECTIONS_MAX = POOL_MAX + HEARTBEAT_IN_FLIGHT + 1
OFFLINE_AFTER_S = 3.0
WARM_UP_S = 4.0
TEST_APP = "registry-soak-test"
# Growth allowed from the warmed-up sample to the last one.
RSS_GROWTH_KIB = 25 * 1024
RSS_GROWTH_SHARE = 0.2
PLUGIN = "soak"
PLUGIN_FILES = {"plugin.py": "print('soak')\n", "lib/util.py": "VALUE = 1\n"}

pytestmark = pytest.mark.timeout(SOAK_S + 150)


@dataclass
class Runtime:
    """One simulated workspace runtime."""

    workspace: Workspace
    plugin_dir: Path
    observed: list[dict[str, str]] = field(default_factory=list)  # loaded at its last restart
    acks: list[str] = field(default_factory=list)
    restarted_for: set[str] = field(default_factory=set)
    silent_until: float = 0.0
    tasks: int = 0

    def restart(self) -> None:
        """Load what is on disk; the interpreter leaves generated files behind."""
        if not self.plugin_dir.is_dir():
            self.observed = []
            return
        cache = self.plugin_dir / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / f"plugin.cpython-311.{len(self.restarted_for)}.pyc").write_bytes(b"\x00" * 64)
        self.observed = [{"name": PLUGIN, "sha": tree_digest(self.plugin_dir)}]


@dataclass
class Seen:
    at: float
    workspace: str
    status: int | None
    actions: list[dict[str, Any]]
    error: str | None


# Alone: a soak that measures flatness of memory must not share the machine with the suite.
# (Its 10 connections once read as a leak against a bound of 8 + 1 that forgot the heartbeat
# pool: the bound is both pools' maximum plus the LISTEN connection.)
@pytest.mark.serial
async def test_a_converged_fleet_stays_converged_with_flat_memory_and_connections(
    dsn: str, db: asyncpg.Connection, tmp_path: Path, plugin_sources: Path, processes: Processes
) -> None:
    plugin = write_tree(plugin_sources / PLUGIN, PLUGIN_FILES)
    sha = tree_digest(plugin)
    env = registry_env(
        plugin_sources,
        tmp_path,
        heartbeat_interval_s=1,
        offline_after_s=OFFLINE_AFTER_S,
        sweep_interval_s=0.5,
        reconcile_poll_s=0.3,
        reconcile_lease_s=5,
        pool_max_size=POOL_MAX,
        heartbeat_max_in_flight=HEARTBEAT_IN_FLIGHT,
        log_level="warning",
    )
    plugins_root = tmp_path / "plugins"
    rng = random.Random(0x50AC)
    seen: list[Seen] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    samples: list[tuple[float, int, int]] = []  # (seconds since warm-up, RSS KiB, connections)

    since = await db.fetchval("SELECT clock_timestamp()")
    process = processes.registry(dsn, tmp_path, env)
    try:
        async with (
            aiohttp.ClientSession() as session,
            asyncpg.create_pool(
                dsn, min_size=1, max_size=2, server_settings={"application_name": TEST_APP}
            ) as pool,
        ):
            await process.wait_healthy()
            api = Api(session)
            runtimes = []
            for _ in range(WORKSPACES):
                workspace = await api.create_workspace(
                    process.url, [{"source": f"file://{plugin}"}]
                )
                runtimes.append(Runtime(workspace, plugins_root / workspace.id / PLUGIN))

            async def run(runtime: Runtime, own: random.Random) -> None:
                while not stop.is_set():
                    if time.monotonic() < runtime.silent_until:
                        await asyncio.sleep(0.1)
                        continue
                    runtime.tasks += 1
                    acks, runtime.acks = runtime.acks, []
                    answer = await heartbeat(
                        session,
                        process.url,
                        runtime.workspace,
                        active_tasks=runtime.tasks,
                        plugins=runtime.observed,
                        acks=acks,
                    )
                    actions = answer.body.get("actions", []) if answer.status == 200 else []
                    seen.append(
                        Seen(
                            time.monotonic(),
                            runtime.workspace.id,
                            answer.status,
                            actions,
                            answer.error or (None if answer.status == 200 else str(answer.body)),
                        )
                    )
                    if answer.status != 200:
                        runtime.acks = acks + runtime.acks  # not delivered: send them again
                    for action in actions:
                        if (
                            action["type"] == "restart"
                            and action["id"] not in runtime.restarted_for
                        ):
                            runtime.restarted_for.add(action["id"])
                            await asyncio.to_thread(runtime.restart)
                            runtime.acks.append(action["id"])
                    interval = (
                        answer.body.get("next_heartbeat_s", 1.0) if answer.status == 200 else 1
                    )
                    await asyncio.sleep(min(float(interval), 1.0) * own.uniform(0.4, 0.6))

            tasks = [
                asyncio.create_task(run(r, random.Random(rng.randrange(1 << 30)))) for r in runtimes
            ]

            # Convergence: every workspace installed once, restarted once, and reports it.
            async def converged() -> bool:
                if any(not r.observed or r.acks for r in runtimes):
                    return False
                pending = await pool.fetchval(
                    "SELECT count(*) FROM workspace_actions WHERE acked_at IS NULL"
                )
                reported = await pool.fetchval(
                    "SELECT count(*) FROM workspaces w JOIN reported_plugins r"
                    " ON r.workspace_id = w.id WHERE w.status = 'online'"
                    " AND r.plugins = $1::jsonb",
                    f'[{{"name": "{PLUGIN}", "sha": "{sha}"}}]',
                )
                return pending == 0 and reported == WORKSPACES and not await active_runs(pool)

            assert await poll(converged, 60.0, 0.2), process.log()[-6000:]
            converged_at = time.monotonic()
            converged_db = await pool.fetchval("SELECT clock_timestamp()")
            actions_at_convergence = await pool.fetchval("SELECT count(*) FROM workspace_actions")
            assert actions_at_convergence == WORKSPACES
            assert all(r.observed == [{"name": PLUGIN, "sha": sha}] for r in runtimes)

            flips = {"db": 0, "silence": 0, "manual": 0}

            async def churn() -> None:
                own = random.Random(rng.randrange(1 << 30))
                while not stop.is_set():
                    await asyncio.sleep(own.uniform(0.2, 0.6))
                    runtime = own.choice(runtimes)
                    roll = own.random()
                    if roll < 0.6:
                        if await set_offline(pool, runtime.workspace.id) is not None:
                            flips["db"] += 1
                    elif roll < 0.8:
                        silent = [r for r in runtimes if r.silent_until > time.monotonic()]
                        if len(silent) < 2:
                            runtime.silent_until = time.monotonic() + OFFLINE_AFTER_S + 1.5
                            flips["silence"] += 1
                    else:
                        answer = await request_reconcile(session, process.url, runtime.workspace)
                        if answer.status in (200, 202):
                            flips["manual"] += 1

            tasks.append(asyncio.create_task(churn()))

            async def sample() -> tuple[int, int]:
                assert_alive(process)
                return rss_kib(process.process.pid), await server_connections(db, TEST_APP, since)

            await asyncio.sleep(WARM_UP_S)
            warmed_at = time.monotonic()
            base_rss, base_connections = await sample()
            samples.append((0.0, base_rss, base_connections))
            while time.monotonic() - warmed_at < SOAK_S:
                await asyncio.sleep(min(2.0, max(0.1, SOAK_S / 10)))
                rss, connections = await sample()
                samples.append((round(time.monotonic() - warmed_at, 1), rss, connections))
            end_rss, end_connections = samples[-1][1:]

            # Let the last flips come back online and their reconciles finish.
            stop.set()
            await asyncio.gather(*tasks)
            for runtime in runtimes:
                runtime.silent_until = 0.0
            stop.clear()
            final = [
                asyncio.create_task(run(r, random.Random(rng.randrange(1 << 30)))) for r in runtimes
            ]
            tasks = final

            async def quiet() -> bool:
                online = await pool.fetchval(
                    "SELECT count(*) FROM workspaces WHERE status = 'online'"
                )
                return online == WORKSPACES and not await active_runs(pool)

            quiet_ok = await poll(quiet, 30.0, 0.2)
            stop.set()
            await asyncio.gather(*tasks)

            runs = await pool.fetch(
                "SELECT id, trigger, status, error, restart_requested, restart_withheld"
                " FROM reconciles WHERE created_at > $1",
                converged_db,
            )
            steps = await pool.fetch(
                "SELECT s.plugin, s.action, s.status FROM reconcile_steps s"
                " JOIN reconciles r ON r.id = s.reconcile_id WHERE r.created_at > $1",
                converged_db,
            )
            actions_at_end = await pool.fetchval("SELECT count(*) FROM workspace_actions")
            sweeps = await pool.fetchval(
                "SELECT count(*) FROM workspace_events WHERE cause = 'heartbeat_timeout'"
                " AND at > $1",
                converged_db,
            )
            guard = await pool.fetchval("SELECT holding FROM fleet_guard")
            assert_alive(process)
            log = process.log()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(process.stop)

    report = f"samples={samples}\nflips={flips}\nlog tail:\n{log[-4000:]}"
    assert quiet_ok, report
    # The registry answered every beat.
    failures = [(s.status, s.error) for s in seen if s.status != 200]
    assert failures == [], (failures[:10], report)
    # The churn really happened, both ways, and each came back through a reconcile.
    assert flips["db"] >= 5 and flips["silence"] >= 1 and flips["manual"] >= 1, report
    assert sweeps >= 1, report
    assert guard is False
    assert len(runs) >= flips["db"], report

    # Converged means converged: no restart asked, no action added, every run a no-op.
    late_actions = [(s.workspace, s.actions) for s in seen if s.at > converged_at and s.actions]
    assert late_actions == [], late_actions[:10]
    assert actions_at_end == actions_at_convergence
    assert {r["status"] for r in runs} == {"succeeded"}, [dict(r) for r in runs][:10]
    assert not any(r["restart_requested"] or r["restart_withheld"] for r in runs)
    assert {(s["plugin"], s["action"], s["status"]) for s in steps} == {(PLUGIN, "skip", "skipped")}
    assert len(steps) == len(runs)

    # Flat: memory within +25 MiB or +20% of the warmed-up sample, and never more server
    # connections than both pools' maximum plus the LISTEN connection.
    allowed = max(RSS_GROWTH_KIB, int(base_rss * RSS_GROWTH_SHARE))
    assert end_rss - base_rss < allowed, report
    assert max(c for _, _, c in samples) <= CONNECTIONS_MAX, report
    assert end_connections <= max(base_connections, CONNECTIONS_MAX), report
