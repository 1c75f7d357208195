"""Operational endpoints for load balancers and orchestrators; no token needed."""

from __future__ import annotations

from aiohttp import web

from registry import __version__
from registry.db.migrate import pending_migrations
from registry.errors import ServiceUnavailable
from registry.jsonio import json_response
from registry.keys import POOL


async def get_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def get_readyz(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire() as conn:
        pending = await pending_migrations(conn)
    if pending:
        raise ServiceUnavailable(
            f"{len(pending)} migration(s) not applied", code="migrations_pending"
        )
    return json_response({"status": "ready"})


async def get_buildinfo(request: web.Request) -> web.Response:
    return json_response({"version": __version__})
