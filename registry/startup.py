"""`registry serve`: listen at once, answer 503 `starting` until ready, then serve the app.

The listening socket is bound before anything touches the database. Until migrations are
applied and the app has started (pools open, background workers running), a stand-in answers on
it: `/healthz` 200 (the process is alive), `/readyz`, `/metrics` and every runtime and API
route 503 `starting` with Retry-After, so runtimes that retry on connection errors wait
instead of hot-looping against a closed port. Then the app takes the socket over; the port
never refuses a connection in between.

While the database is unreachable, start-up retries with capped backoff, one warning line per
attempt. Any other failure (a migration that does not apply, a database that refuses the
password or does not exist) ends start-up with its message: retrying would not fix it, and
endless 503s would hide it.

Why a stand-in and not a readiness flag inside the app: aiohttp freezes an application's state
once it has started, so pools opened afterwards could not be published under its keys. The app
therefore starts exactly as it always has (and as the tests start it), just behind the stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from registry.app import create_app
from registry.db.errors import DatabaseUnavailable, database_calls
from registry.db.maintenance import check_server
from registry.db.migrate import MigrationError, migrate
from registry.errors import Starting, error_middleware
from registry.handlers.openapi import get_openapi
from registry.handlers.operations import get_buildinfo, get_healthz, process_view
from registry.keys import METRICS
from registry.logs import echo_request_id, request_id_middleware
from registry.protocol import ConnectionLimits, EnvelopeAppRunner
from registry.resources import connection_cap, install_accept_error_log, raise_fd_limit
from registry.settings import Settings
from registry.worker_metrics import view_app
from registry.workers import Worker, view_address

SOLE = Worker()

log = logging.getLogger(__name__)

T = TypeVar("T")

# Start-up retries while the database is unreachable: soon at first (a database started
# alongside is usually up within a second), doubling up to a cap, so a registry waiting out a
# long outage costs the database one connection attempt every few seconds.
RETRY_BASE_S = 0.5
RETRY_CAP_S = 5.0
# The stand-in's answers are immediate 503s; at the handover they get this long to finish.
HANDOVER_GRACE_S = 1.0
BACKLOG = 128


class StartupError(RuntimeError):
    """Start-up failed for a reason that retrying will not fix."""


async def _starting(request: web.Request) -> web.StreamResponse:
    raise Starting("the registry is starting: migrations or the database are not ready yet")


def stand_in() -> web.Application:
    """What answers on the port while the registry starts, with the app's envelope and request
    ids: the process-level routes (they need nothing the start-up opens), and 503 `starting`
    for every other path and method, /readyz and /metrics included."""
    app = web.Application(middlewares=[request_id_middleware, error_middleware])
    app.on_response_prepare.append(echo_request_id)
    for path, handler in (
        ("/healthz", get_healthz),
        ("/buildinfo", get_buildinfo),
        ("/openapi.json", get_openapi),
    ):
        # add_get answers HEAD too, as the app's probes do.
        app.router.add_get(path, handler, name=handler.__name__)
    app.router.add_route("*", "/{path:.*}", _starting, name="starting")
    return app


async def until_reachable(step: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run `attempt` until it succeeds, retrying only while the database is unreachable."""
    delay = RETRY_BASE_S
    number = 0
    while True:
        number += 1
        try:
            # Migrations connect on their own (the pools classify their checkouts): what
            # asyncpg raised because the database is unreachable is DatabaseUnavailable.
            with database_calls():
                return await attempt()
        except DatabaseUnavailable as exc:
            log.warning(
                "start-up: %s: database unreachable (attempt %d: %s); retrying in %.1f s",
                step,
                number,
                exc,
                delay,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_CAP_S)


def connection_limits(settings: Settings, max_connections: int) -> ConnectionLimits:
    return ConnectionLimits(
        head_timeout_s=settings.head_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=max_connections,
    )


async def _started(
    settings: Settings, dsn: str, limits: ConnectionLimits | None = None, worker: Worker = SOLE
) -> web.AppRunner:
    """The app, started: pools open, background work running. A fresh app per attempt, since
    an aiohttp application starts only once; what a failed attempt opened is closed again.
    `limits`: as the settings say, unless `serve` lowered the connection cap."""
    limits = limits or connection_limits(settings, settings.max_connections)
    app = create_app(settings, dsn, worker)
    turned_away = app[METRICS].turned_away
    runner = EnvelopeAppRunner(
        app,
        limits=dataclasses.replace(
            limits, turned_away=lambda reason: turned_away.labels(reason).inc()
        ),
        # Per-request access logs would cost the heartbeat path; /metrics counts requests.
        access_log=None,
        # SIGTERM: stop accepting, let in-flight requests finish within the grace period.
        shutdown_timeout=settings.shutdown_grace_s,
    )
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_up(
    settings: Settings, dsn: str, limits: ConnectionLimits | None = None, worker: Worker = SOLE
) -> web.AppRunner:
    """Migrations applied and the app started, retrying while the database is unreachable."""
    try:
        applied = await until_reachable(
            "migrations", lambda: migrate(dsn, connect_timeout_s=settings.db_timeout_s)
        )
        log.info("migrations: %d applied", len(applied))
        if worker.index == 0:  # one warning per server, not one per worker
            await check_server(dsn, connect_timeout_s=settings.db_timeout_s)
        return await until_reachable(
            "opening the pools", lambda: _started(settings, dsn, limits, worker)
        )
    except MigrationError:
        raise
    except Exception as exc:
        raise StartupError(f"start-up failed: {type(exc).__name__}: {exc}") from exc


def _bind(host: str, port: int, shared: bool = False) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to, as aiohttp's TCPSite would;
    `shared`: with SO_REUSEPORT, so each worker of `serve --workers` binds the port too and the
    kernel spreads new connections over them."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in found):
            listeners.append(
                socket.create_server(address, family=family, backlog=BACKLOG, reuse_port=shared)
            )
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


async def _serve(settings: Settings, dsn: str, worker: Worker) -> None:
    fd_limit = raise_fd_limit()
    install_accept_error_log(fd_limit)
    limits = connection_limits(settings, connection_cap(settings.max_connections, fd_limit))
    listeners = _bind(settings.host, settings.port, shared=worker.shares_port)
    waiting = EnvelopeAppRunner(
        stand_in(), limits=limits, access_log=None, shutdown_timeout=HANDOVER_GRACE_S
    )
    try:
        await waiting.setup()
        # The stand-in serves duplicates of the sockets: closing its copies at the handover
        # leaves the app's open, and both accept meanwhile, so no connection is refused.
        for listener in listeners:
            await web.SockSite(waiting, listener.dup()).start()
        runner = await start_up(settings, dsn, limits, worker)
        try:
            async with _sibling_view(runner.app, settings, worker):
                for listener in listeners:
                    await web.SockSite(runner, listener).start()
                await waiting.cleanup()
                log.info("ready")
                await asyncio.Event().wait()  # until cancelled: SIGTERM or SIGINT
        finally:
            await runner.cleanup()
    finally:
        # Safe whatever happened: before setup, or after the handover's own cleanup, it finds
        # nothing left to close.
        await waiting.cleanup()
        for listener in listeners:
            listener.close()


@contextlib.asynccontextmanager
async def _sibling_view(
    app: web.Application, settings: Settings, worker: Worker
) -> AsyncIterator[None]:
    """With several workers: this one's own /metrics for its siblings (worker_metrics.py)."""
    if not worker.shares_port:
        yield
        return
    runner = web.AppRunner(view_app(lambda: process_view(app)), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, view_address(settings.host, settings.port, worker.index)).start()
        yield
    finally:
        await runner.cleanup()


async def serve(settings: Settings, dsn: str, worker: Worker = SOLE) -> None:
    """Serve until SIGTERM or SIGINT, which also interrupt a start-up still in progress.
    Raises MigrationError or StartupError when start-up fails for good."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Cancelling unwinds whatever runs, migrations and pool connects included; the
        # `finally` clauses above close what was opened, the app within its grace period.
        loop.add_signal_handler(signum, task.cancel)
    try:
        await _serve(settings, dsn, worker)
    except asyncio.CancelledError:
        log.info("stopped")
