"""Registry processes started the way operators start them: `python -m registry serve`."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.registry_proc import free_port, spawn, stop_process
from tests.support import ADMIN_TOKEN

__all__ = ["RegistryProcess", "free_port", "start_registry"]


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


def start_registry(dsn: str, work_dir: Path, env: dict[str, str] | None = None) -> RegistryProcess:
    return RegistryProcess(
        *spawn(dsn, work_dir, {"REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})
    )
