"""The benchmarks run end to end with tiny fleets (figures printed, not judged)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

from bench.git_daemon import CountingGitDaemon
from bench.pgbench import find_pgbench
from tests.processes import Processes

ROOT = Path(__file__).resolve().parents[1]
WITHIN_S = 120.0


async def run_bench(
    processes: Processes, tmp_path: Path, module: str, *args: str
) -> tuple[int | None, str]:
    """`python -m bench.<module> ARGS` in a child process, as an operator runs it: its
    subprocesses and sockets stay out of this interpreter (and out of filterwarnings=error).
    A session of its own: should it fail or time out, the fixture stops the registries and
    generators it started too, not only the bench."""
    out, err = tmp_path / f"{module}.stdout", tmp_path / f"{module}.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        bench = processes.adopt(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"bench.{module}",
                *args,
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            ),
            group=True,
        )
    await asyncio.wait_for(bench.wait(), WITHIN_S)
    return bench.returncode, out.read_text() + err.read_text()


async def test_heartbeat_bench_completes_and_prints_its_figures(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    # The Python generator always exists.
    code, printed = await run_bench(
        processes,
        tmp_path,
        "heartbeat",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=200",
        "--connections=8",
        "--duration=2",
        "--warmup=0.5",
        "--generator=python",
        f"--pgbench={find_pgbench()}",
    )
    assert code == 0, printed
    for figure in (
        "pgbench single statement",
        "registry coalesced",
        "registry per-request",
        "registry (coalesced) / pgbench =",
        "coalesced / per-request",
    ):
        assert figure in printed, printed
    # Varying bodies (uptime growing) never look like a restart: nothing else is written.
    assert printed.count("; 0 events, 0 runs |") == 2, printed


async def test_heartbeat_bench_on_a_fleet_made_through_the_api(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    """--fleet api: made by POST /workspaces, flipped online, reconciled, restarted and
    settled before measuring; then beats that vary (uptime growing) write nothing but the
    beats in every registry phase: no beat looked like a restart."""
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    code, printed = await run_bench(
        processes,
        tmp_path,
        "heartbeat",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--fleet=api",
        "--workspaces=20",
        "--seed-connections=4",
        "--connections=4",
        "--duration=1",
        "--warmup=0.5",
        "--generator=python",
        f"--pgbench={find_pgbench()}",
    )
    assert code == 0, printed
    for figure in (
        "each then beat online (a reconcile each): 20 in",
        "api fleet: reconciles drained (20 runs, none failed)",
        "(20 handed out, restarted and acknowledged; 0 actions still pending)",
        "api fleet: settled (20 runs in all, no plugins_sync mark left)",
        "| pgbench single statement | ",
        "rows by bench_fleet lookup",
        "| registry coalesced, the process that made the fleet | ",
        "| registry coalesced | ",
        "| registry per-request | ",
        "registry (coalesced) / pgbench =",
        "load average",
    ):
        assert figure in printed, printed
    # The three registry phases (the fleet's maker, coalesced, per request).
    assert printed.count("; 0 events, 0 runs |") == 3, printed


async def test_history_bench_measures_sizes_and_routes(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    common = (f"--dsn={server_dsn}", f"--database={database}")

    sized, sizes = await run_bench(
        processes, tmp_path, "history", "sizes", *common, "--workspaces=10", "--flaps=2"
    )
    scaled, scale = await run_bench(
        processes,
        tmp_path,
        "history",
        "scale",
        *common,
        "--workspaces=200",
        "--events=5000",
        "--runs=1000",
        "--samples=3",
    )

    assert sized == 0, sizes
    assert "| workspace_events | 2.00 |" in sizes, sizes
    assert "kept for 100k workspaces" in sizes, sizes
    assert scaled == 0, scale
    for figure in ("| GET /workspaces/{id} |", "| GET /fleet |", "rows/s", "SSE"):
        assert figure in scale, scale


async def test_fanout_bench_completes_and_prints_every_mode(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    code, printed = await run_bench(
        processes,
        tmp_path,
        "fanout",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=3",
        "--files=3",
    )

    assert code == 0, printed
    for figure in (
        "| mode | workspaces | git connections |",
        "| unshared (before) | 3 |",
        "| shared resolution, no tree cache | 3 |",
        "| shared resolution + tree cache | 3 |",
    ):
        assert figure in printed, printed


async def test_event_stream_bench_completes_and_prints_its_figures(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    code, printed = await run_bench(
        processes,
        tmp_path,
        "event_stream",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=50",
        "--subscribers=10",
        "--heartbeat-rate=20",
        "--event-rate=10",
        "--duration=1",
        "--warmup=0.5",
        "--idle=0.5",
        "--settle=0.2",
        "--drain=0.5",
    )
    assert code == 0, printed
    for figure in (
        "heartbeats, 0 subscribers",
        "heartbeats, 10 subscribers",
        "heartbeat p99:",
        "event delivery delay",
        "10 connected, 0 refused, 0 dropped",
        "idle, database transactions/s:",
    ):
        assert figure in printed, printed


async def test_sync_marks_bench_compares_the_marks_on_and_off(
    server_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    code, printed = await run_bench(
        processes,
        tmp_path,
        "sync_marks",
        f"--dsn={server_dsn}",
        f"--database={database}",
        "--workspaces=100",
        "--batch=10",
        "--rounds=2",
        "--batches-per-round=2",
    )
    assert code == 0, printed
    assert printed.count("on / off (median time per beat) =") == 2, printed
    # Round 0 changed 2 batches of 10 reports once; unchanged reports after it wrote none.
    assert "marks written meanwhile (round 0 changed every report once): 20" in printed, printed


def test_the_counting_git_daemon_leaves_no_process_behind(tmp_path: Path) -> None:
    # `git daemon` runs git-daemon as its child: stopping `git` alone once left one serving
    # per test, orphaned, for as long as the machine ran.
    base = tmp_path / "served"
    (base / "repo").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(base / "repo")], check=True)
    with CountingGitDaemon(base, tmp_path) as daemon:
        listed = subprocess.run(["git", "ls-remote", daemon.url("repo")], capture_output=True)
        assert listed.returncode == 0, listed.stderr
        assert daemon.connections() == 1

    serving = subprocess.run(["pgrep", "-f", f"base-path={base}"], capture_output=True, text=True)
    assert serving.stdout == ""
