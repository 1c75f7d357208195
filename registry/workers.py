"""`registry serve --workers N`: N processes answering on one port, and their supervisor.

Each worker is an ordinary `registry serve` process (migrations, pools, coalescer, background
loops: everything as one process has it), started again with `_REGISTRY_WORKER=i/N` in its
environment. Each binds the port itself with SO_REUSEPORT, so the kernel spreads new
connections over the workers' listening sockets; nothing is shared between them but
PostgreSQL, exactly as between replicas on several machines (the sweeper, the sequencer, the
pruner and migrations take advisory locks, reconciles take leases, the staging area and the
tree cache lock per process).

Why our own supervisor and not gunicorn's aiohttp worker: `serve` binds before start-up and
hands a stand-in's socket over to the app (registry/startup.py), drains on SIGTERM within its
own grace period and hands reconciles back; gunicorn would own the sockets and the signals and
bring a second set of timeouts and a pre-fork model that forks after importing the app. What a
supervisor must do here is small: start N, forward SIGTERM once, wait, and fail loudly.

A worker that exits while the others serve takes the whole down (exit status 1, or the
worker's own non-zero status): restarting it here would hide a crash loop from the service
manager (systemd, Kubernetes) that restarts the registry and reports it. The others drain as
on SIGTERM first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

WORKER_ENV = "_REGISTRY_WORKER"
# How often the supervisor looks at its workers; a signal is seen at the next look.
POLL_S = 0.1
# Beyond the workers' own grace period: start-up and teardown of their loops.
STOP_MARGIN_S = 15.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Worker:
    """Which worker this process is: index 0..count-1 (a single process is 0 of 1)."""

    index: int = 0
    count: int = 1

    @property
    def shares_port(self) -> bool:
        return self.count > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Worker:
        raw = (os.environ if environ is None else environ).get(WORKER_ENV)
        if not raw:
            return cls()
        index, count = (int(part) for part in raw.split("/"))
        return cls(index, count)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), which a container may limit."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def view_address(host: str, port: int, index: int) -> str:
    """Where worker `index` answers its siblings' /metrics (an abstract Unix socket: nothing
    on disk, gone with the process; the name includes the address every worker shares)."""
    return f"\0registry-worker:{host}:{port}:{index}"


def check_port_free(host: str, port: int) -> None:
    """Raise OSError when something already listens on the port: SO_REUSEPORT would let a
    second registry of the same user join the first one's port group silently."""
    for family, _, _, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the supervisor dies (even by SIGKILL), so no
    worker outlives it holding the port. Linux only; elsewhere nothing."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, command: Sequence[str], env: Mapping[str, str], count: int) -> None:
        self._command = list(command)
        self._env = dict(env)
        self._count = count
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command,
            env={**self._env, WORKER_ENV: f"{index}/{self._count}"},
            # Its own process group: a Ctrl-C on the terminal reaches the supervisor only, which
            # forwards one SIGTERM (a second signal would cut a worker's drain short).
            process_group=0,
            # Between fork and exec; the supervisor runs no threads that could hold a lock.
            preexec_fn=_die_with_parent,
        )

    def run(self, grace_s: float) -> int:
        """Start the workers, serve until SIGTERM/SIGINT or a worker's exit; the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        status = 0
        try:
            for index in range(self._count):
                self._workers.append(self._start(index))
            log.info(
                "supervising %d workers (pids %s)",
                self._count,
                " ".join(str(worker.pid) for worker in self._workers),
            )
            status = self._watch()
        finally:
            stopped = self._stop_all(grace_s + STOP_MARGIN_S)
        if status == 0 and not stopped:
            status = 1
        return status

    def _watch(self) -> int:
        while self._stop_signal is None:
            for index, worker in enumerate(self._workers):
                code = worker.poll()
                if code is not None:
                    log.error(
                        "worker %d (pid %d) exited with status %d; stopping the others",
                        index,
                        worker.pid,
                        code,
                    )
                    return code if code > 0 else 1
            time.sleep(POLL_S)
        log.info("signal %d: stopping %d workers", self._stop_signal, self._count)
        return 0

    def _stop_all(self, within_s: float) -> bool:
        """SIGTERM every worker once, wait for all, SIGKILL what is left after `within_s`.
        True when every worker exited by itself with status 0."""
        for worker in self._workers:
            if worker.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within_s
        clean = True
        for index, worker in enumerate(self._workers):
            try:
                code = worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time: killed", index, worker.pid)
                worker.kill()
                code = worker.wait()
            clean = clean and code == 0
        return clean
