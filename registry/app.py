"""create_app: the aiohttp application and the lifetime of every resource it holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import aiojobs
from aiohttp import web

from registry.auth import admin_auth_middleware
from registry.db.pool import create_heartbeat_pool, create_pool
from registry.db.reconciles import RestartBudget
from registry.errors import DATABASE_DOWN, Handler, error_middleware
from registry.events import EventHub
from registry.ingest import HeartbeatIngest
from registry.keys import (
    DSN,
    EVENT_HUB,
    IGNORED_FIELDS,
    INGEST,
    METRICS,
    POOL,
    RECONCILER,
    REFUSALS,
    SETTINGS,
    SOURCES,
)
from registry.liveness import LivenessSweeper
from registry.logs import echo_request_id, request_id_middleware
from registry.metrics import Metrics
from registry.plugins import FetchLimits, SourceSettings
from registry.reconcile.runner import ReconcileConfig, Reconciler
from registry.reconcile.worker import ReconcileWorker, new_owner_id
from registry.refusals import RefusalLog
from registry.retention import Pruner
from registry.routes import setup_routes
from registry.settings import Settings
from registry.tolerance import IgnoredFieldReporter

log = logging.getLogger(__name__)

# Background loops stop at their next wake-up, well within this.
LOOP_STOP_S = 5.0
# After the scheduler cancels a job, how long it may take to hand its run back.
CANCEL_GRACE_S = 5.0


@web.middleware
async def fresh_connections_after_outage(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """After a database error, replace the pool's connections: the pool skips its reset
    round trip (db/pool.py), so a connection broken by an outage would otherwise be reused."""
    try:
        return await handler(request)
    except DATABASE_DOWN:
        if POOL in request.app:
            await request.app[POOL].expire_connections()
        raise


def create_app(settings: Settings, dsn: str) -> web.Application:
    """Build the application; no I/O happens until it starts."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            fresh_connections_after_outage,
            admin_auth_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[DSN] = dsn
    app[METRICS] = Metrics()
    app[IGNORED_FIELDS] = IgnoredFieldReporter(app[METRICS])
    app[REFUSALS] = RefusalLog(app[METRICS])
    app[SOURCES] = source_settings(settings)
    app.on_response_prepare.append(echo_request_id)
    setup_routes(app)
    # Dependency order: the pool first, background work last, so jobs drain before the
    # pool closes.
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_end_streams)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Closed in reverse order at teardown, and also when opening the second pool fails (or
    # start-up is cancelled meanwhile): aiohttp only tears down contexts that finished starting.
    async with contextlib.AsyncExitStack() as opened:
        pool = await create_pool(settings, app[DSN])
        opened.push_async_callback(pool.close)
        heartbeat_pool = await create_heartbeat_pool(settings, app[DSN])
        opened.push_async_callback(heartbeat_pool.close)
        app[POOL] = pool
        app[INGEST] = HeartbeatIngest(
            heartbeat_pool,
            app[METRICS],
            coalesce=settings.heartbeat_coalesce,
            max_batch=settings.heartbeat_max_batch,
            max_in_flight=settings.heartbeat_max_in_flight,
            # Only gaps the liveness window could have allowed measure the runtime's interval.
            max_interval_s=settings.offline_after_max_s,
        )
        yield


def source_settings(settings: Settings) -> SourceSettings:
    return SourceSettings(
        github_base=settings.github_base,
        gitea_scheme=settings.gitea_scheme,
        allowlist=settings.plugin_allowlist,
    )


def reconcile_config(settings: Settings, sources: SourceSettings) -> ReconcileConfig:
    return ReconcileConfig(
        plugins_dir=settings.resolved_plugins_dir,
        sources=sources,
        limits=FetchLimits(
            max_bytes=settings.fetch_max_bytes,
            max_files=settings.fetch_max_files,
            timeout_s=settings.fetch_timeout_s,
        ),
        timeout_s=settings.reconcile_timeout_s,
        max_attempts=settings.reconcile_max_attempts,
        retry_base_s=settings.reconcile_retry_base_s,
        retry_cap_s=settings.reconcile_retry_cap_s,
        restart_budget=RestartBudget(settings.restart_budget, settings.restart_budget_window_s),
    )


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The reconcile worker, the liveness sweeper and the event hub, as aiojobs jobs."""
    settings, pool = app[SETTINGS], app[POOL]
    scheduler = aiojobs.Scheduler(close_timeout=CANCEL_GRACE_S)
    # One client session for deliveries to runtimes; its connection pool is shared.
    http = aiohttp.ClientSession()
    owner = new_owner_id()
    worker = ReconcileWorker(
        pool,
        scheduler,
        Reconciler(
            pool, scheduler, http, reconcile_config(settings, app[SOURCES]), owner, app[METRICS]
        ),
        owner=owner,
        concurrency=settings.reconcile_concurrency,
        poll_s=settings.reconcile_poll_s,
        lease_s=settings.reconcile_lease_s,
    )
    sweeper = LivenessSweeper(pool, settings, app[METRICS])
    hub = EventHub(pool, app[DSN])
    pruner = Pruner(pool, settings, app[METRICS])
    app[RECONCILER] = worker
    app[EVENT_HUB] = hub
    stop_refusals = asyncio.Event()
    loops = [
        await scheduler.spawn(worker.run_forever(), name="reconcile-worker"),
        await scheduler.spawn(sweeper.run_forever(), name="liveness-sweeper"),
        await scheduler.spawn(hub.run_sequencer(), name="event-sequencer"),
        await scheduler.spawn(hub.run_listener(), name="event-listener"),
        await scheduler.spawn(pruner.run_forever(), name="retention-pruner"),
        await scheduler.spawn(
            app[REFUSALS].run_forever(pool, settings.refusal_flush_interval_s, stop_refusals),
            name="refusal-flusher",
        ),
    ]
    yield
    # Stop the loops first, so nothing is claimed that the closing scheduler would refuse;
    # running reconciles get the grace period to finish, then are cancelled and hand their
    # runs back as queued intents.
    worker.stop()
    sweeper.stop()
    pruner.stop()
    hub.stop()
    stop_refusals.set()
    for loop in loops:
        await loop.wait(timeout=LOOP_STOP_S)
    await scheduler.wait_and_close(timeout=settings.shutdown_grace_s)
    # close() cancels shielded terminal writes too: whatever is still held goes back now.
    await worker.hand_back()
    await http.close()


async def _end_streams(app: web.Application) -> None:
    """on_shutdown: event streams end now instead of holding the shutdown to its timeout."""
    app[EVENT_HUB].stop()
