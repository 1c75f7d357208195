"""Processes the tests start, and who stops them.

Registries are started the way operators start them (`python -m registry serve`), always
through a `Processes` owner (the `processes` fixture, or `async with Processes()` in a helper):
a process that outlives its test keeps claiming reconciles from the ones after it, so no
failure, assertion or timeout in the middle of a test may leave one running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiohttp

from bench.registry_proc import free_port, spawn, stop_process
from tests.support import ADMIN_TOKEN

__all__ = ["Processes", "RegistryProcess", "free_port", "registry_children", "start_registry"]

AnyProcess = TypeVar("AnyProcess", subprocess.Popen[bytes], asyncio.subprocess.Process)


@dataclass
class RegistryProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, within_s: float = 20.0) -> None:
        """Until the process is ready: /readyz, since /healthz answers while it starts."""
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process.poll() is None, f"registry exited early:\n{self.log()}"
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"registry did not start:\n{self.log()}"
                await asyncio.sleep(0.1)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, within_s: float = 20.0) -> int:
        return stop_process(self.process, within_s)


def start_registry(
    dsn: str,
    work_dir: Path,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> RegistryProcess:
    """Unowned: tests use `Processes.registry` (the `processes` fixture) instead."""
    return RegistryProcess(
        *spawn(dsn, work_dir, {"REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}, preexec_fn)
    )


@dataclass
class _Owned:
    process: subprocess.Popen[bytes] | asyncio.subprocess.Process
    group: bool  # started with start_new_session=True: its whole process group is stopped

    def running(self) -> bool:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll() is None
        return self.process.returncode is None

    def signal(self, signum: int) -> None:
        # Gone already (exited, or not reaped yet): nothing to stop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.process.pid, signum)
            elif self.running():
                self.process.send_signal(signum)

    async def exited(self, within_s: float | None) -> bool:
        if isinstance(self.process, asyncio.subprocess.Process):
            try:
                await asyncio.wait_for(self.process.wait(), within_s)
            except TimeoutError:
                return False
            return True
        # A Popen is polled, not waited on: the loop keeps serving the test's fakes meanwhile.
        deadline = None if within_s is None else time.monotonic() + within_s
        while self.process.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class Processes:
    """Owns every process a test starts; on exit stops those still running, however it exits.

    SIGTERM to all at once (a registry then drains and releases its leases), one shared grace,
    then SIGKILL for the rest; each is waited for, so none is left running or unreaped.
    """

    def __init__(self, grace_s: float = 15.0) -> None:
        # Longer than the registry's own default shutdown grace (10 s).
        self.grace_s = grace_s
        self._owned: list[_Owned] = []

    def adopt(self, process: AnyProcess, *, group: bool = False) -> AnyProcess:
        self._owned.append(_Owned(process, group))
        return process

    def registry(
        self,
        dsn: str,
        work_dir: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> RegistryProcess:
        """`python -m registry serve` on a free port, stopped with this owner."""
        started = start_registry(dsn, work_dir, env, preexec_fn)
        self.adopt(started.process)
        return started

    async def stop_all(self) -> None:
        owned, self._owned = self._owned, []
        for each in owned:
            each.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s

        async def reap(each: _Owned) -> None:
            if not await each.exited(max(0.0, deadline - time.monotonic())):
                each.signal(signal.SIGKILL)
                await each.exited(None)
            if each.group:
                each.signal(signal.SIGKILL)  # whatever of the group outlived its leader

        await asyncio.gather(*(reap(each) for each in owned))

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()


def registry_children() -> list[int]:
    """Running `python -m registry` children of this process (Linux; elsewhere none are seen)."""
    found = []
    for listing in Path("/proc/self/task").glob("*/children"):
        try:
            pids = listing.read_text().split()
        except OSError:
            continue  # that thread ended between the listing and the read
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if argv[1:3] == [b"-m", b"registry"] and state not in ("Z", "X"):
                found.append(int(pid))
    return found
