"""schemathesis, from outside: the CLI against a real `registry serve` on a fresh database.

The configuration is tests/schemathesis/schemathesis.toml (auth for both token kinds, real ids,
expected statuses, bounds); this test starts the process, creates the workspaces it names and
runs `schemathesis run` with every check, positive and negative data, and every phase (examples,
coverage, fuzzing, stateful). Any finding fails the test; there is no baseline.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import with_database
from tests.processes import RegistryProcess, start_registry
from tests.support import ADMIN, ADMIN_TOKEN, bearer, write_tree

CONFIG = Path(__file__).parent / "schemathesis" / "schemathesis.toml"
HOOKS = CONFIG.with_name("hooks.py")
# The run's own budget is `max-time` in the configuration; this only stops a hung CLI.
CLI_TIMEOUT_S = 240


@pytest.fixture
async def fresh_registry(
    server_dsn: str, tmp_path: Path, plugin_sources: Path
) -> AsyncIterator[RegistryProcess]:
    name = f"registry_st_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    process = start_registry(
        with_database(server_dsn, name),
        tmp_path,
        env={
            "REGISTRY_PLUGIN_ALLOWLIST": f"file://{plugin_sources}/",
            "REGISTRY_RECONCILE_POLL_S": "0.2",
            "REGISTRY_LOG_FORMAT": "text",
        },
    )
    try:
        await process.wait_healthy()
        yield process
    finally:
        process.stop()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def _create(session: aiohttp.ClientSession, url: str, **body: object) -> tuple[str, str]:
    # Names are unique among live workspaces.
    body = {"name": f"st-{uuid.uuid4().hex[:12]}", **body}
    async with session.post(f"{url}/workspaces", json=body, headers=ADMIN) as r:
        assert r.status == 201, await r.text()
        created = await r.json()
    return created["workspace"]["id"], created["token"]


async def prepare(url: str, plugin_sources: Path) -> dict[str, str]:
    """The workspaces the configuration names, each in the state its operations need."""
    plugin = write_tree(plugin_sources / "seo-all", {"plugin.py": "print('seo')\n"})
    async with aiohttp.ClientSession() as session:
        runtime_id, runtime_token = await _create(
            session, url, name="st-runtime", plugins=[{"source": f"file://{plugin}"}]
        )
        async with session.post(
            f"{url}/registry/heartbeat",
            json={"workspace_id": runtime_id},
            headers=bearer(runtime_token),
        ) as beat:
            assert beat.status == 200, await beat.text()
        async with session.post(
            f"{url}/internal/workspaces/{runtime_id}/reconcile", json={}, headers=ADMIN
        ) as requested:
            assert requested.status in (200, 202), await requested.text()
            reconcile_id = (await requested.json())["reconcile"]["id"]
        pause_id, _ = await _create(session, url)
        rotate_id, _ = await _create(session, url)
        doomed_id, _ = await _create(session, url)
        async with session.post(
            f"{url}/tokens", json={"name": "st-doomed", "role": "read"}, headers=ADMIN
        ) as made:
            assert made.status == 201, await made.text()
    return {
        "ST_HOOKS": str(HOOKS),
        "ST_ADMIN_TOKEN": ADMIN_TOKEN,
        "ST_WORKSPACE_TOKEN": runtime_token,
        "ST_RUNTIME_ID": runtime_id,
        "ST_RUNTIME_NAME": "st-runtime",
        "ST_PAUSE_ID": pause_id,
        "ST_ROTATE_ID": rotate_id,
        "ST_DOOMED_ID": doomed_id,
        "ST_RECONCILE_ID": reconcile_id,
        "ST_DOOMED_TOKEN": "st-doomed",
    }


def run_schemathesis(
    url: str, env: dict[str, str], report_dir: Path
) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--report-dir",
        str(report_dir),
        "--no-color",
    ]
    return subprocess.run(
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        cwd=report_dir.parent,
    )


@pytest.mark.long
@pytest.mark.timeout(CLI_TIMEOUT_S + 60)
async def test_schemathesis_finds_nothing(
    fresh_registry: RegistryProcess, plugin_sources: Path, tmp_path: Path
) -> None:
    env = await prepare(fresh_registry.url, plugin_sources)
    started = time.monotonic()
    result = await asyncio.to_thread(run_schemathesis, fresh_registry.url, env, tmp_path / "st")
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    # The summary shows with `pytest -rP`: phases, operations, generated cases.
    print(output[output.rfind("SUMMARY") :] if "SUMMARY" in output else output)
    assert result.returncode == 0, f"schemathesis failed after {elapsed:.0f} s:\n{output}"
    assert "Traceback" not in fresh_registry.log(), fresh_registry.log()


def test_the_hooks_keep_the_link_scan_alive_on_strings_that_do_not_parse() -> None:
    """A 2xx body echoing `http://[` (an agent card's string, say) ended schemathesis 4.32.5's
    run in an internal error; with the hooks loaded, such a string is simply not a link."""
    spec = importlib.util.spec_from_file_location("schemathesis_hooks", HOOKS)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from schemathesis.engine import observations

    origin = ("http", "127.0.0.1:8080")
    assert observations._same_origin_path("http://[", origin) is None
    assert (
        observations._same_origin_path("http://127.0.0.1:8080/workspaces", origin) == "/workspaces"
    )
