"""A source too large for the fetch caps, end to end: stopped mid-transfer, failed once for
good, staged only under the configured staging directory, nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp
import pytest

from bench.disk import peak_bytes_under
from registry.plugins.staging import RUN_PREFIX
from registry.plugins.transfer import TransferCaps
from registry.settings import Settings
from tests.conftest import MakeRegistry
from tests.durability_support import Api, registry_env, wait_until
from tests.processes import Processes
from tests.support import git

MIB = 1024 * 1024
CAP = MIB
REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = 100


def huge_repo(path: Path) -> str:
    """A repository whose one commit holds 6 MiB of incompressible data."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "plugin.py").write_text("print('huge')\n")
    (path / "blob.bin").write_bytes(os.urandom(6 * MIB))
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "huge")
    return f"git+file://{path}#main"


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(RUN_PREFIX))


def everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def tmpdir_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR, for this process and the git it starts, pointed at an empty directory."""
    path = tmp_path / "system-tmp"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from TMPDIR on next use
    return path


@pytest.mark.parametrize(
    "shared",
    [
        # A run's own fetch stages under REGISTRY_STAGING_DIR.
        pytest.param(False, id="staging-dir"),
        # A fan-out's shared fetch fills the tree cache, under REGISTRY_TREE_CACHE_DIR.
        pytest.param(True, id="tree-cache"),
    ],
)
async def test_a_source_over_the_fetch_cap_fails_once_for_good_and_leaves_nothing(
    make_registry: MakeRegistry,
    plugin_sources: Path,
    tmp_path: Path,
    tmpdir_watched: Path,
    shared: bool,
) -> None:
    staging, tree_cache = tmp_path / "staging", tmp_path / "tree-cache"
    registry = await make_registry(
        fetch_max_bytes=CAP,
        fetch_max_files=FILES,
        reconcile_max_attempts=5,
        staging_dir=staging,
        tree_cache_dir=tree_cache,
        fetch_shared=shared,
    )
    source = huge_repo(plugin_sources / "huge")
    [ours] = run_dirs(staging)
    tree_cache.mkdir(exist_ok=True)  # made on first use; watched from the start

    with peak_bytes_under(tree_cache if shared else staging) as peak:
        workspace = await registry.create_workspace([{"source": source, "name": "huge"}])
        await registry.heartbeat(workspace)
        runs = await registry.settled(workspace)

    # Permanent at the first attempt, though four more were allowed for transient failures.
    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 1)]
    assert "fetch_too_large" in runs[0]["error"]
    assert "gave up" not in runs[0]["error"]
    steps = await registry.db.fetch(
        "SELECT attempt, action, status, error FROM reconcile_steps WHERE reconcile_id = $1",
        runs[0]["id"],
    )
    assert [(s["attempt"], s["action"], s["status"]) for s in steps] == [(1, "install", "failed")]
    assert steps[0]["error"].startswith("fetch_too_large: ")
    installed = await registry.db.fetchval(
        "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1", uuid.UUID(workspace.id)
    )
    assert installed == 0
    # The transfer was stopped at its cap: the staging directory never held the 6 MiB.
    assert peak.samples > 0
    assert 0 < peak.bytes <= TransferCaps.for_tree(CAP, FILES).store_bytes < 2 * MIB
    # Staged under the configured directory, never under TMPDIR, and all of it cleaned up.
    assert everything_under(ours) == [".lock"]
    assert everything_under(tree_cache) == []
    assert everything_under(tmpdir_watched) == []


async def test_start_sweeps_what_a_crashed_process_left_in_the_staging_directory(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    # What a process SIGKILLed mid-fetch leaves: its directory, a lock file nobody holds, a
    # partial pack.
    crashed = staging / f"{RUN_PREFIX}999999-0badc0de"
    (crashed / "reconcile-1" / ".fetch-1" / "objects" / "pack").mkdir(parents=True)
    (crashed / ".lock").touch()
    (crashed / "reconcile-1" / ".fetch-1" / "objects" / "pack" / "tmp_pack_1").write_bytes(
        b"PACK" + b"\0" * 4096
    )

    await make_registry(staging_dir=staging)

    assert not crashed.exists()
    [ours] = run_dirs(staging)
    assert ours.name.startswith(f"{RUN_PREFIX}{os.getpid()}-")
    assert os.stat(staging).st_mode & 0o777 == 0o700


def fetch_dirs(staging: Path) -> list[Path]:
    return sorted(staging.glob(f"{RUN_PREFIX}*/reconcile-*/.fetch-*"))


@pytest.mark.timeout(90)
async def test_a_registry_killed_mid_fetch_leaves_staging_the_next_start_removes(
    dsn: str, tmp_path: Path, plugin_sources: Path, silent_git_server: int, processes: Processes
) -> None:
    staging = tmp_path / "staging"
    # Unshared: the run fetches under the staging directory (a shared fetch fills the tree
    # cache, whose own sweep removes a dead process's fill once it is older than its idle time).
    env = registry_env(
        plugin_sources, tmp_path, staging_dir=staging, reconcile_poll_s=0.2, fetch_shared="false"
    )
    hung = f"git+git://127.0.0.1:{silent_git_server}/"
    env["REGISTRY_PLUGIN_ALLOWLIST"] = hung
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with aiohttp.ClientSession() as session:
        api = Api(session)
        a = processes.registry(dsn, tmp_path / "a", env)
        await a.wait_healthy()
        workspace = await api.create_workspace(a.url, [{"source": f"{hung}hung.git#main"}])
        await api.heartbeat(a.url, workspace)

        async def fetching() -> bool:
            return bool(fetch_dirs(staging))

        async def state() -> str:
            return f"staging: {everything_under(staging)}\nA log:\n{a.log()}"

        # A is fetching (the source never answers), its staging directories made: kill it.
        await wait_until(fetching, 20.0, state)
        [crashed] = run_dirs(staging)
        a.process.kill()
        a.process.wait()
        assert fetch_dirs(staging) != []

        b = processes.registry(dsn, tmp_path / "b", env)
        await b.wait_healthy()

    # B's start removed A's leftovers (the git A left hanging, in a session of its own, does
    # not hold A's lock) and staged nothing outside its own directory.
    assert not crashed.exists()
    [ours] = run_dirs(staging)
    assert ours != crashed
    assert "removed 1 directories left by stopped processes" in b.log()


def test_staging_defaults_to_the_data_directory(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).resolved_staging_dir == tmp_path / "staging"
    env = {"REGISTRY_STAGING_DIR": str(tmp_path / "fast-disk")}
    assert Settings.from_env(env).resolved_staging_dir == tmp_path / "fast-disk"


async def test_the_bench_probe_runs_and_reports_the_transfer_stopped() -> None:
    bench = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fetch_cap",
        "--size-mib", "4", "--cap-mib", "1", "--max-files", "100",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(bench.communicate(), 60)

    assert bench.returncode == 0
    report = json.loads(stdout)
    assert report["code"] == "fetch_too_large"
    assert 0 < report["peak_staging_bytes"] <= report["transfer_cap_bytes"] < 2 * MIB
