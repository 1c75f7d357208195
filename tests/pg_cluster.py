"""A PostgreSQL cluster of the test's own, which it can stop and start (database faults)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported for real only inside start(): pgserver warns at import time.
    from pgserver.postgres_server import PostgresServer


class StoppableCluster:
    """Uses the PostgreSQL binaries of the pgserver wheel; the data lives in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: PostgresServer | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres:@/postgres?host={self.data_dir}"

    def _pg_ctl(self, *args: str) -> None:
        from pgserver import _commands

        # pgserver makes one function per bundled binary at import time, so no type names it.
        pg_ctl: Callable[..., object] = vars(_commands)["pg_ctl"]
        assert self._server is not None, "start() first"
        pg_ctl(list(args), pgdata=self.data_dir, user=self._server.system_user)

    def start(self) -> None:
        if self._server is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver.postgres_server import get_server

                # cleanup_mode=None: this object, not pgserver, decides when it stops.
                self._server = get_server(self.data_dir, cleanup_mode=None)
            return
        self._pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self.data_dir}", "-l", f"{self.data_dir}/log", "start"
        )

    def stop(self) -> None:
        # Fast shutdown: open connections are cut, as when a database host goes away.
        self._pg_ctl("-w", "-m", "fast", "stop")
