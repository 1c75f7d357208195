"""The staging root: private, per-process, and swept of what dead processes left behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.plugins.staging import RUN_PREFIX, StagingArea, StagingError

# A process that opens a staging area, stages a file in it, says where, and waits to be
# killed: what a registry SIGKILLed mid-fetch leaves is exactly this.
_HOLDER = """
import sys, time
from pathlib import Path
from registry.plugins.staging import StagingArea
area = StagingArea.open(Path(sys.argv[1]))
(area.path / "reconcile-x").mkdir()
(area.path / "reconcile-x" / "pack").write_bytes(b"x" * 4096)
print(area.path, flush=True)
time.sleep(600)
"""


class Holder:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(root)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.proc.stdout is not None
        self.path = Path(self.proc.stdout.readline().strip())
        assert self.path.is_dir()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_open_makes_a_private_root_and_a_run_directory_of_our_own(tmp_path: Path) -> None:
    root = tmp_path / "data" / "staging"

    area = StagingArea.open(root)
    try:
        assert area.root == root and area.path.parent == root
        assert area.path.name.startswith(f"{RUN_PREFIX}{os.getpid()}-")
        assert mode_of(root) == 0o700
        assert mode_of(area.path) == 0o700
        assert area.swept == []
    finally:
        area.close()

    assert not area.path.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(RUN_PREFIX)] == []


def test_open_tightens_a_root_that_others_can_read(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    root.mkdir(mode=0o755)
    root.chmod(0o777)

    area = StagingArea.open(root)
    area.close()

    assert mode_of(root) == 0o700


def test_a_symlinked_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "staging"
    root.symlink_to(tmp_path / "elsewhere")

    with pytest.raises(StagingError, match="not a plain directory"):
        StagingArea.open(root)

    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    root.mkdir(mode=0o700)
    os.chown(root, 4242, 4242)

    with pytest.raises(StagingError, match="belongs to uid 4242"):
        StagingArea.open(root)


def test_leftovers_of_a_killed_process_go_and_a_live_ones_stay(
    tmp_path: Path, holders: list[Holder]
) -> None:
    root = tmp_path / "staging"
    dead, alive = Holder(root), Holder(root)
    holders += [dead, alive]
    dead.kill()
    # Someone else's file in the root is not ours to delete.
    (root / "operator-notes.txt").write_text("keep me")

    area = StagingArea.open(root)
    try:
        assert area.swept == [dead.path.name]
        assert not dead.path.exists()
        # Without the lock a sweep could not tell a live process's fetch from a dead one's.
        assert (alive.path / "reconcile-x" / "pack").stat().st_size == 4096
        assert (root / "operator-notes.txt").read_text() == "keep me"
    finally:
        area.close()


def test_a_run_directory_without_its_lock_file_is_a_leftover(tmp_path: Path) -> None:
    # An owner that died while close() was removing its directory leaves it half gone.
    root = tmp_path / "staging"
    half_gone = root / f"{RUN_PREFIX}1-deadbeef" / "reconcile-y"
    half_gone.mkdir(parents=True)
    (half_gone / "blob").write_bytes(b"y")

    area = StagingArea.open(root)
    area.close()

    assert area.swept == [f"{RUN_PREFIX}1-deadbeef"]
    assert not half_gone.parent.exists()


def test_two_areas_in_one_process_do_not_sweep_each_other(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    first = StagingArea.open(root)
    second = StagingArea.open(root)
    try:
        assert second.swept == []
        assert first.path.is_dir() and second.path.is_dir()
        assert first.path != second.path
    finally:
        first.close()
        second.close()
