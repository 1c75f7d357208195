"""A real git server on 127.0.0.1 that counts its connections (git daemon + access hook)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

_READY_WITHIN_S = 10.0
_IDENTITY = (
    "-c",
    "user.email=bench@example.com",
    "-c",
    "user.name=bench",
    "-c",
    "commit.gpgsign=false",
)


def commit_files(repo: Path, files: dict[str, str], message: str) -> str:
    """Write ``files`` into the work tree of ``repo`` (made if new) and commit; the sha."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(content)
    for args in (["add", "-A"], ["commit", "-q", "-m", message]):
        subprocess.run(["git", *_IDENTITY, *args], cwd=repo, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    )
    return head.stdout.strip()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class CountingGitDaemon:
    """``git daemon`` serving every repository under ``base``, read-only.

    git runs the access hook once per service request, before upload-pack: one line per git
    connection (an ls-remote is one, a fetch is one). A plain connect, as the readiness
    check makes, requests nothing and is not counted.
    """

    def __init__(self, base: Path, work: Path) -> None:
        self.base = base
        self._log = work / "git-connections.log"
        self._hook = work / "git-access-hook"
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def url(self, repo: str) -> str:
        return f"git://127.0.0.1:{self.port}/{repo}"

    @property
    def allow_prefix(self) -> str:
        return f"git+git://127.0.0.1:{self.port}/"

    def connections(self) -> int:
        try:
            return len(self._log.read_bytes().splitlines())
        except FileNotFoundError:
            return 0

    def start(self) -> None:
        self._hook.write_text(f'#!/bin/sh\necho "$1 $2" >> "{self._log}"\n')
        self._hook.chmod(0o755)
        for _ in range(5):  # the port is free when probed, but could be taken before git binds
            self.port = _free_port()
            self._proc = subprocess.Popen(
                [
                    "git",
                    "daemon",
                    "--reuseaddr",
                    "--listen=127.0.0.1",
                    f"--port={self.port}",
                    f"--base-path={self.base}",
                    "--export-all",
                    f"--access-hook={self._hook}",
                    str(self.base),
                ],
                env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # `git daemon` runs git-daemon as a child and waits for it: killing `git` alone
                # left git-daemon serving, orphaned. The group is what stop() kills.
                start_new_session=True,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError("git daemon did not start")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _READY_WITHIN_S
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.02)
                continue
            return True
        return False

    def stop(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # git, git-daemon and its children
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> CountingGitDaemon:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
