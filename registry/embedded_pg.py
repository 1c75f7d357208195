"""An embedded PostgreSQL for running the registry with no database configured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started."""


def start_embedded_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) a PostgreSQL cluster kept in `data_dir`; return its DSN and handle.

    Uses the `pgserver` wheel, which bundles PostgreSQL binaries, so nothing has to be
    installed on the machine; it also starts when run as root (it runs the server as a
    dedicated OS user then). The data stays in `data_dir` across restarts. The server stops
    when the last process that started it exits.
    """
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is a declared dependency
        raise EmbeddedPostgresError(f"pgserver is not installed: {exc}") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        get_server: Any = pgserver.get_server  # type: ignore[attr-defined]
        server = get_server(str(data_dir), cleanup_mode="stop")
    except Exception as exc:
        raise EmbeddedPostgresError(
            f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
        ) from exc
    dsn = str(server.get_uri())
    log.info("embedded PostgreSQL running, data in %s", data_dir)
    return dsn, server
