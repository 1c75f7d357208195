"""The staging directory: where plugin trees are fetched before they are delivered.

One configured root (REGISTRY_STAGING_DIR), never the system temporary directory: it sits
next to the plugins directory by default, so a delivery is a rename, and its size is the
operator's to plan. Each process stages in a private ``run-*`` directory of its own, which it
holds an flock on for as long as it lives. At start, every ``run-*`` directory whose lock is
no longer held belongs to a process that died mid-fetch and is removed; the directories of
live processes sharing the root are left alone: replicas on one data volume (docker-compose.yml
scales that way), a rolling restart on one host. Their pids may be equal (each container has
its own pid 1), hence the random part of each directory's name. Sweeping and
creating happen under a lock on the root, so a sweep never sees a directory whose owner has
not locked it yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StagingArea", "StagingError", "sweep"]

RUN_PREFIX = "run-"
_RUN_LOCK = ".lock"
_ROOT_LOCK = ".sweep.lock"


class StagingError(RuntimeError):
    """The staging root cannot be used safely; start-up stops with this message."""


def _prepare_root(root: Path) -> Path:
    root = Path(os.path.abspath(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StagingError(f"staging directory {str(root)!r} is not a plain directory")
    if st.st_uid != os.geteuid():
        raise StagingError(
            f"staging directory {str(root)!r} belongs to uid {st.st_uid}, not to this "
            f"process (uid {os.geteuid()})"
        )
    # Fetched trees are untrusted until verified: no other user may read or swap them.
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / _ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _owner_alive(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / _RUN_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # Created under the root lock together with its lock file: without one it is a
        # directory whose owner was already removing it when it died.
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(root: Path) -> list[str]:
    """Remove the run directories under ``root`` whose process is gone; returns their names.

    Call with the root lock held. Only ``run-*`` entries are touched: whatever else an
    operator keeps there is not ours to delete.
    """
    removed: list[str] = []
    with os.scandir(root) as it:
        names = sorted(entry.name for entry in it if entry.name.startswith(RUN_PREFIX))
    for name in names:
        path = root / name
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            path.unlink(missing_ok=True)
        elif _owner_alive(path):
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


@dataclass(slots=True)
class StagingArea:
    """This process's staging directory, ``path``, under the configured ``root``."""

    root: Path
    path: Path
    swept: list[str] = field(default_factory=list)
    _lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path) -> StagingArea:
        """Prepare ``root``, remove what dead processes left there, make our own directory.

        Blocking (filesystem calls and a lock): run it in a thread.
        """
        root = _prepare_root(root)
        with _locked(root):
            swept = sweep(root)
            path = root / f"{RUN_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            os.mkdir(path, 0o700)
            fd = os.open(
                path / _RUN_LOCK,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            # Held until close() or the process's death; O_CLOEXEC keeps it out of the git
            # processes we start, which could otherwise keep a dead process's lock alive.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(root=root, path=path, swept=swept, _lock_fd=fd)

    def close(self) -> None:
        """Remove our directory and everything still staged in it; then release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
