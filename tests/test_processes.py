"""The `processes` fixture: a test that fails half-way leaves none of its processes running;
and a registry started without an owner is caught and stopped when its test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run by a pytest of its own, with this suite's conftest as a plugin: it starts one process of
# each kind the tests start (a Popen, an asyncio one, a session whose child outlives it, one that
# ignores SIGTERM), then fails on an assertion while all of them still run.
FAILING_TEST = """
import asyncio
import subprocess
import sys
import time
from pathlib import Path

SLEEP = "import time; time.sleep(600)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
PARENT = (
    "import subprocess, sys, time; "
    f"child = subprocess.Popen([sys.executable, '-c', {SLEEP!r}]); "
    "print(child.pid, flush=True); time.sleep(600)"
)


async def test_fails_with_processes_running(processes, tmp_path):
    processes.grace_s = 1.0
    pids = [
        processes.adopt(subprocess.Popen([sys.executable, "-c", SLEEP])).pid,
        processes.adopt(subprocess.Popen([sys.executable, "-c", STUBBORN])).pid,
        processes.adopt(await asyncio.create_subprocess_exec(sys.executable, "-c", SLEEP)).pid,
    ]
    parent = processes.adopt(
        subprocess.Popen(
            [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True
        ),
        group=True,
    )
    pids += [parent.pid, int(parent.stdout.readline())]
    Path(PIDS).write_text(" ".join(map(str, pids)))
    assert False, "failing with every process still running"
"""


# A registry nobody owns, waiting for a database that is not there: the test itself passes.
UNOWNED_TEST = """
import time
from pathlib import Path

from tests.processes import registry_children, start_registry


def test_forgets_its_registry(tmp_path):
    started = start_registry("postgresql://nobody@127.0.0.1:1/none", tmp_path)
    Path(PIDS).write_text(str(started.process.pid))
    while started.process.pid not in registry_children():
        time.sleep(0.05)
"""


def run_pytest(test_file: Path) -> tuple[int, str]:
    """A pytest of its own on `test_file`, with this suite's conftest as a plugin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            str(test_file),
        ],
        cwd=test_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def alive(pid: int) -> bool:
    """Running: a zombie (dead, reparented and not yet reaped) does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_failing_test_leaves_no_process_behind(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    test_file = tmp_path / "test_generated.py"
    test_file.write_text(f"PIDS = {str(pids_file)!r}\n{FAILING_TEST}")

    code, output = run_pytest(test_file)

    pids = [int(pid) for pid in pids_file.read_text().split()]
    # A SIGKILL sent last, to what was left of the session, may take a moment to land.
    deadline = time.monotonic() + 5.0
    while (survivors := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in survivors:  # this test's own cleanup when the fixture under test fails
        os.kill(pid, signal.SIGKILL)
    assert (code, len(pids)) == (1, 5), output
    assert "1 failed" in output, output
    assert "failing with every process still running" in output, output
    assert survivors == [], output


def test_a_registry_left_running_fails_its_test_and_is_stopped(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    test_file = tmp_path / "test_generated.py"
    test_file.write_text(f"PIDS = {str(pids_file)!r}\n{UNOWNED_TEST}")

    code, output = run_pytest(test_file)

    pid = int(pids_file.read_text())
    if alive(pid):
        os.kill(pid, signal.SIGKILL)  # this test's own cleanup when the guard under test fails
        raise AssertionError(output)
    assert code == 1, output
    assert "1 passed, 1 error" in output, output
    assert "registry processes outlived the test (killed)" in output, output
