"""Registry processes started the way operators start them: `python -m registry serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support import ADMIN_TOKEN


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RegistryProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process.poll() is None, f"registry exited early:\n{self.log()}"
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"registry did not start:\n{self.log()}"
                await asyncio.sleep(0.1)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, within_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(within_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_registry(dsn: str, work_dir: Path, env: dict[str, str] | None = None) -> RegistryProcess:
    port = free_port()
    log_path = work_dir / f"registry-{port}.log"
    environment = {
        **os.environ,
        "REGISTRY_DSN": dsn,
        "REGISTRY_PORT": str(port),
        "REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
        "REGISTRY_DATA_DIR": str(work_dir / "data"),
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return RegistryProcess(process, f"http://127.0.0.1:{port}", log_path)
