"""Registry processes started the way operators start them: `python -m registry serve`."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)


@dataclass
class RegistryProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(self, within_s: float = 30.0) -> None:
        """Until the process is ready: /readyz, since /healthz answers while it starts."""
        deadline = time.monotonic() + within_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"registry exited early:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self, within_s: float = 20.0) -> int:
        return stop_process(self.process, within_s)


def stop_process(process: subprocess.Popen[bytes], within_s: float = 20.0) -> int:
    """SIGTERM (the graceful path), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(within_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def spawn(
    dsn: str,
    work_dir: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None = None,
    python_args: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`python -m registry serve` on a free port; returns the process, its URL and its log.
    The benchmark and the tests start registries this one way. `preexec_fn` runs in the child
    before it starts (e.g. to lower its resource limits); `python_args` go before `-m registry`
    (e.g. `-m cProfile -o FILE`)."""
    port = free_port()
    log_path = work_dir / f"registry-{port}.log"
    environment = {
        **os.environ,
        "REGISTRY_DSN": dsn,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(work_dir / "data"),
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *python_args, "-m", "registry", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Runs between fork and exec: only calls that are safe there (setrlimit).
            preexec_fn=preexec_fn,
        )
    return process, f"http://127.0.0.1:{port}", log_path


def start(
    dsn: str, work_dir: Path, env: dict[str, str], python_args: tuple[str, ...] = ()
) -> RegistryProcess:
    quiet = {
        "REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
        "REGISTRY_LOG_FORMAT": "text",
        # Warnings still show (a failed batch, a sweep error); info lines are not per request
        # anyway, but keep the log quiet so it costs nothing.
        "REGISTRY_LOG_LEVEL": "warning",
    }
    return RegistryProcess(*spawn(dsn, work_dir, {**quiet, **env}, python_args=python_args))


def start_many(dsn: str, work_dir: Path, env: dict[str, str], count: int) -> list[RegistryProcess]:
    processes = [start(dsn, work_dir, env) for _ in range(count)]
    try:
        for process in processes:
            process.wait_healthy()
    except BaseException:
        for process in processes:
            process.stop()
        raise
    return processes


def worker_pids(url: str, workers: int, within_s: float = 30.0) -> list[int]:
    """The pids of a `serve --workers N` process's workers, from its /metrics, once all N
    answer there (the supervisor's /readyz is one worker's)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            text = ""
        pids = [
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("registry_worker_pid{")
        ]
        if len(pids) == workers:
            return pids
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all {workers} workers answered at {url}/metrics")
        time.sleep(0.2)
