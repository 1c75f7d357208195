"""Operational endpoints for load balancers and orchestrators; no token needed."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registry.buildinfo import build_info
from registry.db.migrate import pending_migrations
from registry.errors import ServiceUnavailable
from registry.jsonio import json_response
from registry.keys import ADMISSION, EVENT_HUB, FLEET_GAUGES, METRICS, POOL, SETTINGS, WORKER
from registry.worker_metrics import merged_view

# Probes must answer quickly even when the database does not.
READINESS_TIMEOUT_S = 2.0


async def get_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire(timeout=READINESS_TIMEOUT_S) as conn:
        pending = await pending_migrations(conn)
    if pending:
        raise ServiceUnavailable(
            f"{len(pending)} migration(s) not applied", code="migrations_pending"
        )
    return json_response({"status": "ready"})


async def get_buildinfo(request: web.Request) -> web.Response:
    return json_response(build_info())


def process_view(app: web.Application) -> bytes:
    """This process's series (and the fleet gauges as last refreshed), in the text format."""
    metrics, pool = app[METRICS], app[POOL]
    metrics.pool_connections.labels("in_use").set(pool.get_size() - pool.get_idle_size())
    metrics.pool_connections.labels("idle").set(pool.get_idle_size())
    metrics.event_subscribers.set(app[EVENT_HUB].subscribers)
    metrics.requests_in_flight.set(app[ADMISSION].in_flight)
    info = build_info()
    metrics.build_info.labels(info["version"] or "unknown", info["git_sha"] or "unknown").set(1)
    return generate_latest(metrics.registry)


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format: this process's series, and the fleet's (registry/fleet_gauges.py);
    with several workers, every worker's series (registry/worker_metrics.py)."""
    app = request.app
    await app[FLEET_GAUGES].refresh(app[POOL])
    body = process_view(app)
    worker = app[WORKER]
    if worker.shares_port:
        settings = app[SETTINGS]
        body = await merged_view(body, worker, settings.host, settings.port)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
