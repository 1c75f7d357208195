"""create_app: the aiohttp application and the lifetime of every resource it holds."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import aiojobs
import asyncpg
from aiohttp import web

from registry.admission import Admission
from registry.auth import admin_auth_middleware
from registry.db.heartbeats import BeatPolicy
from registry.db.pool import create_heartbeat_pool, create_pool
from registry.db.reconciles import RestartBudget
from registry.drift import DriftChecker
from registry.errors import error_middleware
from registry.event_feed import EventFeed
from registry.events import EventHub
from registry.fleet_gauges import FleetGauges
from registry.fleet_history_cache import FleetHistoryCache
from registry.fleet_statuses import FleetStatuses
from registry.http_metrics import http_metrics_middleware
from registry.ingest import HeartbeatIngest
from registry.keys import (
    ADMISSION,
    DSN,
    EVENT_HUB,
    FLEET_GAUGES,
    FLEET_HISTORY,
    FLEET_STATUSES,
    IGNORED_FIELDS,
    INGEST,
    METRICS,
    POOL,
    RECONCILER,
    REFUSALS,
    SETTINGS,
    SOURCES,
    WORKER,
)
from registry.liveness import LivenessSweeper
from registry.logs import echo_request_id, request_id_middleware
from registry.metrics import Metrics
from registry.plugins import FetchLimits, SourceSettings
from registry.plugins.staging import StagingArea
from registry.query import strict_query_middleware
from registry.reconcile.runner import ReconcileConfig, Reconciler, TreeCacheConfig
from registry.reconcile.worker import ReconcileWorker, new_owner_id
from registry.refusals import RefusalLog
from registry.retention import Pruner
from registry.routes import setup_routes
from registry.settings import Settings
from registry.sync_state import run_forever as refresh_sync_forever
from registry.tolerance import IgnoredFieldReporter
from registry.workers import Worker

log = logging.getLogger(__name__)

# Background loops stop at their next wake-up, well within this.
LOOP_STOP_S = 5.0
# After the scheduler cancels a job, how long it may take to hand its run back.
CANCEL_GRACE_S = 5.0
# Closing a pool waits for every connection to come back; one that leaked (checked out and
# never released) would hold SIGTERM forever. After this long the rest are terminated.
POOL_CLOSE_S = 5.0
# The delivery client's connections are closed locally; this only bounds a stuck close.
HTTP_CLOSE_S = 5.0


def create_app(settings: Settings, dsn: str, worker: Worker | None = None) -> web.Application:
    """Build the application; no I/O happens until it starts. `worker`: which of several
    processes on one port this is (default: the only one)."""
    metrics = Metrics()
    admission = Admission(settings.max_requests_in_flight, metrics.turned_away)
    app = web.Application(
        middlewares=[
            http_metrics_middleware,
            request_id_middleware,
            error_middleware,
            # After the error middleware, which renders its 503.
            admission.middleware(),
            admin_auth_middleware,
            strict_query_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[DSN] = dsn
    app[WORKER] = worker or Worker()
    app[METRICS] = metrics
    app[ADMISSION] = admission
    app[IGNORED_FIELDS] = IgnoredFieldReporter(app[METRICS])
    app[REFUSALS] = RefusalLog(app[METRICS])
    app[FLEET_GAUGES] = FleetGauges(app[METRICS], settings.metrics_cache_s)
    app[FLEET_HISTORY] = FleetHistoryCache()
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
        opened.push_async_callback(_close_pool, pool, "main")
        heartbeat_pool = await create_heartbeat_pool(settings, app[DSN])
        opened.push_async_callback(_close_pool, heartbeat_pool, "heartbeat")
        app[POOL] = pool
        app[FLEET_STATUSES] = FleetStatuses(pool, settings.fleet_cache_s)
        # Before the pool closes: a background count may be using it.
        opened.push_async_callback(app[FLEET_STATUSES].close)
        app[INGEST] = HeartbeatIngest(
            heartbeat_pool,
            app[METRICS],
            coalesce=settings.heartbeat_coalesce,
            max_batch=settings.heartbeat_max_batch,
            max_in_flight=settings.heartbeat_max_in_flight,
            policy=BeatPolicy(
                # Only gaps the liveness window could allow measure the runtime's interval.
                max_interval_s=settings.offline_after_max_s,
                restart_reconcile_every_s=settings.restart_reconcile_every_s,
            ),
        )
        yield


async def _close_pool(pool: asyncpg.Pool, name: str) -> None:
    """Close a pool within POOL_CLOSE_S; connections still checked out then are terminated."""
    try:
        # On timeout wait_for cancels close(), which then terminates the pool itself;
        # terminate() below is for the record (and a no-op once closed).
        await asyncio.wait_for(pool.close(), POOL_CLOSE_S)
    except TimeoutError:
        log.warning(
            "%s pool: a connection was not returned within %.1f s of closing; terminated",
            name,
            POOL_CLOSE_S,
        )
        pool.terminate()


def source_settings(settings: Settings) -> SourceSettings:
    return SourceSettings(
        github_base=settings.github_base,
        gitea_scheme=settings.gitea_scheme,
        allowlist=settings.plugin_allowlist,
    )


def reconcile_config(
    settings: Settings, sources: SourceSettings, staging: StagingArea
) -> ReconcileConfig:
    return ReconcileConfig(
        plugins_dir=settings.resolved_plugins_dir,
        staging_dir=staging.path,
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
        tree_cache=TreeCacheConfig(
            settings.resolved_tree_cache_dir,
            settings.tree_cache_idle_s,
            settings.tree_cache_max_bytes,
        ),
        fetch_shared=settings.fetch_shared,
    )


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The reconcile worker, the liveness sweeper and the event hub, as aiojobs jobs."""
    settings, pool = app[SETTINGS], app[POOL]
    # Everything is released in reverse order, at teardown and also when a later step of the
    # start fails: the loops started so far stop, the scheduler closes, the session closes.
    async with contextlib.AsyncExitStack() as opened:
        # One client session for deliveries to runtimes; its connection pool is shared. It
        # closes last, after the scheduler has drained the reconciles delivering through it.
        http = aiohttp.ClientSession()
        opened.push_async_callback(_close_http, http)
        # Removed once the scheduler has drained the reconciles staging in it.
        staging = await _open_staging(settings)
        opened.push_async_callback(asyncio.to_thread, staging.close)
        # Once the scheduler has closed (it cancels shielded terminal writes too), the worker
        # gives back whatever runs it still holds; it exists only once built, hence the list.
        built: list[ReconcileWorker] = []
        opened.push_async_callback(_hand_back, built)
        scheduler = aiojobs.Scheduler(close_timeout=CANCEL_GRACE_S)
        opened.push_async_callback(_close_scheduler, scheduler, settings.shutdown_grace_s)
        owner = new_owner_id()
        worker = ReconcileWorker(
            pool,
            scheduler,
            Reconciler(
                pool,
                scheduler,
                http,
                reconcile_config(settings, app[SOURCES], staging),
                owner,
                app[METRICS],
            ),
            owner=owner,
            concurrency=settings.reconcile_concurrency,
            poll_s=settings.reconcile_poll_s,
            lease_s=settings.reconcile_lease_s,
        )
        built.append(worker)
        ingest = app[INGEST]
        sweeper = LivenessSweeper(
            pool, settings, app[METRICS], refused=lambda: ingest.unreachable_batches
        )
        feed = EventFeed(
            pool,
            poll_s=settings.event_poll_s,
            queue_size=settings.event_subscriber_queue,
            max_subscribers=settings.event_max_subscribers,
            writes_per_s=settings.event_writes_per_s,
            on_events=app[FLEET_STATUSES].invalidate,
        )
        hub = EventHub(pool, app[DSN], feed)
        pruner = Pruner(pool, settings, app[METRICS])
        drift = DriftChecker(pool, settings, worker.wake)
        app[RECONCILER] = worker
        app[EVENT_HUB] = hub
        stop_refusals = asyncio.Event()
        stop_sync = asyncio.Event()
        # Each loop with what stops it; a coroutine is made only when it is spawned, so a
        # failed spawn leaves none that was never awaited.
        starts: list[tuple[str, Callable[[], Coroutine[Any, Any, None]], Callable[[], None]]] = [
            ("reconcile-worker", worker.run_forever, worker.stop),
            ("liveness-sweeper", sweeper.run_forever, sweeper.stop),
            ("event-sequencer", hub.run_sequencer, hub.stop),
            ("event-listener", hub.run_listener, hub.stop),
            ("event-feed", feed.run, feed.stop),
            ("retention-pruner", pruner.run_forever, pruner.stop),
            ("drift-checker", drift.run_forever, drift.stop),
            (
                "refusal-flusher",
                functools.partial(
                    app[REFUSALS].run_forever,
                    pool,
                    settings.refusal_flush_interval_s,
                    stop_refusals,
                ),
                stop_refusals.set,
            ),
            (
                "plugins-sync-refresher",
                functools.partial(refresh_sync_forever, pool, stop_sync),
                stop_sync.set,
            ),
        ]
        loops: list[tuple[aiojobs.Job[None], Callable[[], None]]] = []
        opened.push_async_callback(_stop_loops, loops)
        for name, run, stop in starts:
            loops.append((await scheduler.spawn(run(), name=name), stop))
        yield
        # Teardown, by the stack (last pushed first): stop the loops, so nothing is claimed
        # that the closing scheduler would refuse; running reconciles get the grace period to
        # finish, then are cancelled and hand their runs back as queued intents; then the
        # session closes.


async def _open_staging(settings: Settings) -> StagingArea:
    staging = await asyncio.to_thread(StagingArea.open, settings.resolved_staging_dir)
    if staging.swept:
        log.info(
            "staging: removed %d directories left by stopped processes in %s",
            len(staging.swept),
            staging.root,
        )
    return staging


async def _stop_loops(loops: list[tuple[aiojobs.Job[None], Callable[[], None]]]) -> None:
    for _, stop in loops:
        stop()
    # Waited for together, so the loops' bound is LOOP_STOP_S (+ CANCEL_GRACE_S for one that
    # had to be cancelled), not the sum of them.
    ended = await asyncio.gather(
        *(job.wait(timeout=LOOP_STOP_S) for job, _ in loops), return_exceptions=True
    )
    for (job, _), result in zip(loops, ended, strict=True):
        if isinstance(result, BaseException):
            # Timed out (the job is then cancelled), or it had already failed (and logged
            # it): either way it is over, and the rest of the teardown goes on.
            log.warning("background loop %s ended badly: %r", job.get_name(), result)


async def _close_scheduler(scheduler: aiojobs.Scheduler, grace_s: float) -> None:
    # wait_and_close bounds itself (the grace period, then CANCEL_GRACE_S per cancelled
    # job, in parallel); the outer limit holds even against a job that ignores cancellation.
    try:
        await asyncio.wait_for(
            scheduler.wait_and_close(timeout=grace_s), grace_s + CANCEL_GRACE_S + 1.0
        )
    except TimeoutError:
        log.warning("job scheduler: jobs still running after the grace period; left behind")


async def _hand_back(built: list[ReconcileWorker]) -> None:
    for worker in built:
        await worker.hand_back()


async def _close_http(http: aiohttp.ClientSession) -> None:
    try:
        await asyncio.wait_for(http.close(), HTTP_CLOSE_S)
    except TimeoutError:
        log.warning("delivery client session did not close within %.1f s", HTTP_CLOSE_S)


async def _end_streams(app: web.Application) -> None:
    """on_shutdown: event streams end now instead of holding the shutdown to its timeout."""
    app[EVENT_HUB].stop()
