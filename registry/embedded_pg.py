"""An embedded PostgreSQL for running the registry with no database configured."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started."""


def start_embedded_postgres(data_dir: Path, *, keep_data: bool = True) -> tuple[str, Any]:
    """Start (or reuse) a PostgreSQL cluster kept in `data_dir`; return its DSN and handle.

    Uses the `pgserver` wheel, which bundles PostgreSQL binaries, so nothing has to be
    installed on the machine; it also starts when run as root (it runs the server as a
    dedicated OS user then). With `keep_data` the data stays in `data_dir` across restarts;
    otherwise it is deleted when the server stops. The server stops when the last process that
    started it exits.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); harmless.
            warnings.simplefilter("ignore")
            import pgserver

            get_server: Any = pgserver.get_server  # type: ignore[attr-defined]
            server = get_server(str(data_dir), cleanup_mode="stop" if keep_data else "delete")
    except Exception as exc:
        raise EmbeddedPostgresError(
            f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
        ) from exc
    dsn = str(server.get_uri())
    log.info("embedded PostgreSQL running, data in %s", data_dir)
    return dsn, server
