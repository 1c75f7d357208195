"""The heartbeat benchmark runs end to end with a tiny fleet (figures printed, not judged)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from bench.pgbench import find_pgbench

ROOT = Path(__file__).resolve().parents[1]


def test_heartbeat_bench_completes_and_prints_its_figures(server_dsn: str) -> None:
    database = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    # A child process, as an operator runs it: its subprocesses and sockets stay out of
    # this interpreter (and out of filterwarnings=error). The Python generator always exists.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.heartbeat",
            f"--dsn={server_dsn}",
            f"--database={database}",
            "--workspaces=200",
            "--connections=8",
            "--duration=2",
            "--warmup=0.5",
            "--generator=python",
            f"--pgbench={find_pgbench()}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for figure in (
        "pgbench single statement",
        "registry coalesced",
        "registry per-request",
        "registry (coalesced) / pgbench =",
        "coalesced / per-request",
    ):
        assert figure in done.stdout, done.stdout
