"""The benchmarks run end to end with tiny inputs (figures printed, not judged)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from bench.pgbench import find_pgbench
from tests.processes import Processes

ROOT = Path(__file__).resolve().parents[1]
WITHIN_S = 120.0


async def run_bench(processes: Processes, tmp_path: Path, module: str, *args: str) -> str:
    """Run `python -m <module> <args>` to completion; what it printed (fails on a bad exit)."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    # A child process, as an operator runs it: its subprocesses and sockets stay out of
    # this interpreter (and out of filterwarnings=error). The Python generator always exists.
    # A session of its own: should it fail or time out, the fixture stops the registries and
    # generators it started too, not only the bench.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        bench = processes.adopt(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            ),
            group=True,
        )
    await asyncio.wait_for(bench.wait(), WITHIN_S)
    printed = out.read_text()
    assert bench.returncode == 0, printed + err.read_text()
    return printed


async def test_heartbeat_bench_completes_and_prints_its_figures(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    printed = await run_bench(
        processes,
        tmp_path,
        "bench.heartbeat",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=200",
        "--connections=8",
        "--duration=2",
        "--warmup=0.5",
        "--generator=python",
        f"--pgbench={find_pgbench()}",
    )
    for figure in (
        "pgbench single statement",
        "registry coalesced",
        "registry per-request",
        "registry (coalesced) / pgbench =",
        "coalesced / per-request",
    ):
        assert figure in printed, printed


async def test_fanout_bench_completes_and_prints_every_mode(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_fanout_smoke_{uuid.uuid4().hex[:8]}"
    printed = await run_bench(
        processes,
        tmp_path,
        "bench.fanout",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=3",
        "--files=3",
    )
    for figure in (
        "| mode | workspaces | git connections |",
        "| unshared (before) | 3 |",
        "| shared resolution, no tree cache | 3 |",
        "| shared resolution + tree cache | 3 |",
    ):
        assert figure in printed, printed
