"""Where the suite's PostgreSQL comes from: an explicit DSN, a container, or embedded.

The chain is REGISTRY_TEST_DSN -> testcontainers (when a Docker daemon answers AND the container
starts) -> an embedded server. REGISTRY_TEST_DOCKER forces the middle step: `0` never uses Docker
(even when a daemon answers), `1` uses only Docker and fails loudly if it cannot serve; unset, a
daemon that answers but cannot supply a container (no image, no registry, no Ryuk) falls back to
embedded instead of failing every database test.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# The container this process started, for the summary below: (short id, image, dsn sans password).
started: list[tuple[str, str, str]] = []

IMAGE_ENV = "REGISTRY_TEST_PG_IMAGE"
DEFAULT_IMAGE = "postgres:16-alpine"
SWITCH_ENV = "REGISTRY_TEST_DOCKER"


class DockerUnavailable(Exception):
    """Docker was asked for (REGISTRY_TEST_DOCKER=1) and could not serve a PostgreSQL."""


def docker_answers() -> bool:
    """Ask the daemon's /_ping directly: cheap, and leaks nothing when no daemon runs."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        parts = urlsplit(host)
        family, address = socket.AF_INET, (parts.hostname, parts.port or 2375)  # type: ignore[assignment]
    else:
        return False
    try:
        with socket.socket(family) as conn:
            conn.settimeout(1)
            conn.connect(address)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in conn.recv(64)
    except OSError:
        return False


def docker_switch() -> bool | None:
    """REGISTRY_TEST_DOCKER: True (only Docker), False (never Docker), None (when it works)."""
    value = os.environ.get(SWITCH_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise DockerUnavailable(f"{SWITCH_ENV} must be 0, 1 or unset, not {value!r}")


def postgres_container_class() -> Any:
    """testcontainers' current PostgresContainer; its deprecated module only on old releases."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # pragma: no cover - releases before 4.15 had only this module
        from testcontainers.postgres import PostgresContainer
    return PostgresContainer


@contextlib.contextmanager
def container_dsn() -> Iterator[tuple[str, str]]:
    """Start a PostgreSQL container; yields (dsn, short container id)."""
    postgres_container = postgres_container_class()
    image = os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)
    container = postgres_container(image, driver=None)
    container.start()
    try:
        dsn, short_id = container.get_connection_url(), container.get_wrapped_container().short_id
        started.append((short_id, image, _without_password(dsn)))
        yield dsn, short_id
    finally:
        container.stop()


# Under pytest-xdist the controller starts the one container and hands it to every worker in
# node.workerinput under this key (JSON: {"dsn", "container"} or {"error"}): a container per
# worker would cost each its start-up and memory, while the suite already isolates tests by
# database (a database per worker for `dsn`, one per test for `empty_dsn`).
SHARED_KEY = "registry_shared_server"


class SharedContainer:
    """The controller's container for the xdist workers; stopped once, by the controller."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.dsn = self.container = self.error = ""

    def start(self) -> None:
        try:
            self.dsn, self.container = self._stack.enter_context(container_dsn())
        except Exception as exc:  # the workers decide: fall back to embedded, or fail if forced
            self.error = repr(exc)

    def for_workers(self) -> str:
        if self.error:
            return json.dumps({"error": self.error})
        return json.dumps({"dsn": self.dsn, "container": self.container})

    def stop(self) -> None:
        self._stack.close()


def shared_for_worker(workerinput: dict[str, Any] | None) -> dict[str, str] | None:
    """What the controller handed this xdist worker; None outside xdist or on another path."""
    if workerinput is None or SHARED_KEY not in workerinput:
        return None
    shared: dict[str, str] = json.loads(workerinput[SHARED_KEY])
    return shared


def _without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}" if parts.username else parts.netloc
    return parts._replace(netloc=netloc).geturl()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """With `-p tests.pg_source`: say which container served the run, after the results.

    The session fixture's own line is written while pytest captures the test's output, so a
    passing run never shows it; this summary is what proves a run took the testcontainers path.
    """
    if not started:
        terminalreporter.write_line("registry database: no testcontainers container was started")
    for short_id, image, dsn in started:
        terminalreporter.write_line(
            f"registry database: testcontainers container={short_id} image={image} dsn={dsn}"
        )
