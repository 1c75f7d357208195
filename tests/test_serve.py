"""`python -m registry serve`: migrates, serves, answers heartbeats, stops cleanly."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.processes import Processes
from tests.support import ADMIN, bearer


async def test_serve_migrates_a_fresh_database_then_serves(
    empty_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    registry = processes.registry(empty_dsn, tmp_path)
    await registry.wait_healthy()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{registry.url}/readyz") as ready:
            assert ready.status == 200
        async with session.post(
            f"{registry.url}/workspaces", json={"name": "w"}, headers=ADMIN
        ) as created:
            assert created.status == 201
            body = await created.json()
        async with session.post(
            f"{registry.url}/registry/heartbeat",
            json={"workspace_id": body["workspace"]["id"]},
            headers=bearer(body["token"]),
        ) as beat:
            assert (await beat.json())["previous_status"] == "provisioning"
    assert registry.stop() == 0


async def test_serve_refuses_a_bad_setting(tmp_path: Path, dsn: str, processes: Processes) -> None:
    registry = processes.registry(dsn, tmp_path, env={"REGISTRY_PORT": "99999"})

    code = registry.process.wait(30)

    assert code == 2
    assert "port must be 1..65535" in registry.log()
