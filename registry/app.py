"""create_app: the aiohttp application and the lifetime of every resource it holds."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import aiojobs
from aiohttp import web

from registry.auth import admin_auth_middleware
from registry.db.pool import create_pool
from registry.db.reconciles import RestartBudget
from registry.errors import error_middleware
from registry.handlers.workspaces import source_settings
from registry.keys import DSN, POOL, RECONCILER, SCHEDULER, SETTINGS
from registry.plugins import FetchLimits
from registry.reconcile.runner import ReconcileConfig, Reconciler
from registry.reconcile.worker import ReconcileWorker, new_owner_id
from registry.routes import setup_routes
from registry.settings import Settings

log = logging.getLogger(__name__)

# How long shutdown waits for running reconciles before handing them back as intents.
SHUTDOWN_GRACE_S = 10.0


def create_app(settings: Settings, dsn: str) -> web.Application:
    """Build the application; no I/O happens until it starts."""
    app = web.Application(
        middlewares=[error_middleware, admin_auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[DSN] = dsn
    setup_routes(app)
    # Dependency order: the pool first, the scheduler and worker last, so jobs drain
    # before the pool closes.
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_reconciles)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS], app[DSN])
    app[POOL] = pool
    yield
    await pool.close()


async def _reconciles(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    scheduler = aiojobs.Scheduler(close_timeout=SHUTDOWN_GRACE_S)
    # One client session for deliveries to runtimes; its connection pool is shared.
    http = aiohttp.ClientSession(raise_for_status=False)
    owner = new_owner_id()
    config = ReconcileConfig(
        plugins_dir=settings.resolved_plugins_dir,
        sources=source_settings(settings),
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
    worker = ReconcileWorker(
        app[POOL],
        scheduler,
        Reconciler(app[POOL], scheduler, http, config, owner),
        owner=owner,
        concurrency=settings.reconcile_concurrency,
        poll_s=settings.reconcile_poll_s,
        lease_s=settings.reconcile_lease_s,
    )
    app[SCHEDULER] = scheduler
    app[RECONCILER] = worker
    loop_job = await scheduler.spawn(worker.run_forever(), name="reconcile-worker")
    yield
    # Stop claiming first, so nothing is claimed that the closing scheduler would refuse;
    # then running reconciles are cancelled and hand their runs back as intents.
    worker.stop()
    await loop_job.wait(timeout=SHUTDOWN_GRACE_S)
    await scheduler.close()
    await http.close()
