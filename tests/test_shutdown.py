"""Graceful shutdown: SIGTERM during a reconcile and under heartbeat traffic loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

from tests.durability_support import (
    Api,
    plugin_runtime,
    registry_env,
    registry_processes,
    runs_of,
    wait_until,
)
from tests.support import Workspace, bearer, write_tree


async def beat_until_refused(
    session: aiohttp.ClientSession, base: str, workspace: Workspace, acked: list[int]
) -> None:
    """Heartbeat in a loop, counting up active_tasks; remember every value that got a 200."""
    for tasks in range(1, 100_000):
        try:
            async with session.post(
                f"{base}/registry/heartbeat",
                json={"workspace_id": workspace.id, "active_tasks": tasks},
                headers=bearer(workspace.token),
            ) as response:
                if response.status == 200:
                    acked.append(tasks)
        except aiohttp.ClientError:
            return
        await asyncio.sleep(0.005)


async def test_sigterm_during_a_reconcile_exits_cleanly_and_loses_nothing(
    dsn: str, db: asyncpg.Connection, plugin_sources: Path, tmp_path: Path
) -> None:
    plugin = write_tree(plugin_sources / "tool", {"tool.py": "print('tool')\n"})
    env = registry_env(
        plugin_sources, tmp_path, shutdown_grace_s=1.5, reconcile_poll_s=0.2, reconcile_lease_s=30
    )
    async with (
        plugin_runtime(hold_first=1) as runtime,
        aiohttp.ClientSession() as session,
        registry_processes(dsn, tmp_path / "first", 1, env) as [first],
    ):
        api = Api(session)
        workspace = await api.create_workspace(
            first.url, [{"source": f"file://{plugin}"}], delivery="http", url=runtime.url
        )
        busy = await api.create_workspace(first.url, [])
        await api.heartbeat(first.url, workspace)
        await runtime.wait_for_puts(1)  # the reconcile is now mid-delivery
        acked: list[int] = []
        beating = asyncio.ensure_future(beat_until_refused(session, first.url, busy, acked))
        await asyncio.sleep(0.3)

        first.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(first.process.wait, 30)
        took = time.monotonic() - started
        await beating
        after_stop = await runs_of(db, workspace.id)

        # Nothing acknowledged was lost: the last heartbeat that got a 200 is in the database.
        stored = await db.fetchval(
            "SELECT active_tasks FROM workspaces WHERE id = $1", uuid.UUID(busy.id)
        )
        # The interrupted run was handed back as an intent; the next process completes it.
        async with registry_processes(dsn, tmp_path / "second", 1, env):

            async def finished() -> bool:
                runs = await runs_of(db, workspace.id)
                return [r["status"] for r in runs] == ["succeeded"]

            async def describe() -> str:
                return str(await runs_of(db, workspace.id))

            await wait_until(finished, 20, describe)

    assert code == 0, first.log()
    assert took < 1.5 + 8  # the grace period plus start-up and teardown of the loops
    assert [r["status"] for r in after_stop] in (["queued"], ["succeeded"])
    assert acked
    assert stored >= acked[-1]
    final = await runs_of(db, workspace.id)
    assert final[0]["attempt"] == 2
    installed = await db.fetchval(
        "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1", uuid.UUID(workspace.id)
    )
    assert installed == 1
