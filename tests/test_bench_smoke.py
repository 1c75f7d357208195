"""The heartbeat and event-stream benchmarks run end to end with tiny numbers (figures printed,
not judged)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from bench.pgbench import find_pgbench
from tests.processes import Processes

ROOT = Path(__file__).resolve().parents[1]
WITHIN_S = 120.0


async def run_bench(
    module: str, args: list[str], server_dsn: str, tmp_path: Path, processes: Processes
) -> str:
    """`python -m <module>` on a database of its own; what it printed (it must exit 0)."""
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    # A child process, as an operator runs it: its subprocesses and sockets stay out of
    # this interpreter (and out of filterwarnings=error). A session of its own: should it
    # fail or time out, the fixture stops the registries and generators it started too, not
    # only the bench.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        bench = processes.adopt(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                f"--dsn={server_dsn}",
                f"--database={database}",
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
    # The Python generator always exists.
    printed = await run_bench(
        "bench.heartbeat",
        [
            "--workspaces=200",
            "--connections=8",
            "--duration=2",
            "--warmup=0.5",
            "--generator=python",
            f"--pgbench={find_pgbench()}",
        ],
        server_dsn,
        tmp_path,
        processes,
    )
    for figure in (
        "pgbench single statement",
        "registry coalesced",
        "registry per-request",
        "registry (coalesced) / pgbench =",
        "coalesced / per-request",
    ):
        assert figure in printed, printed


async def test_event_stream_bench_completes_and_prints_its_figures(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    printed = await run_bench(
        "bench.event_stream",
        [
            "--workspaces=50",
            "--subscribers=10",
            "--heartbeat-rate=20",
            "--event-rate=10",
            "--duration=1",
            "--warmup=0.5",
            "--idle=0.5",
            "--settle=0.2",
            "--drain=0.5",
        ],
        server_dsn,
        tmp_path,
        processes,
    )
    for figure in (
        "heartbeats, 0 subscribers",
        "heartbeats, 10 subscribers",
        "heartbeat p99:",
        "event delivery delay",
        "10 connected, 0 refused, 0 dropped",
        "idle, database transactions/s:",
    ):
        assert figure in printed, printed
