"""Acknowledging the mass-expiry guard (operate role): the operator says the silence is real."""

from __future__ import annotations

from aiohttp import web

from registry import audit
from registry import validation as v
from registry.auth import actor
from registry.db import fleet
from registry.errors import Conflict
from registry.handlers.events import guard_view
from registry.jsonio import json_response
from registry.keys import POOL


async def post_guard_ack(request: web.Request) -> web.Response:
    """While the guard holds, the sweeper expires silent workspaces slowly; acknowledged, it
    expires them at its normal pace until the guard lets go by itself (a later mass expiry
    holds again). Audited; acknowledging an acknowledged hold changes nothing."""
    v.reject_unknown_fields(await v.read_optional_json_object(request), ())
    entry = audit.Entry(actor(request), "mass_expiry_guard_acknowledged")
    async with audit.audited(request.app[POOL], entry) as conn:
        guard = await fleet.acknowledge_guard(conn, entry.actor)
        if guard is None:
            raise Conflict("the mass-expiry guard is not holding", code="guard_not_holding")
        entry.detail = {
            "since": None if guard.since is None else guard.since.isoformat(),
            "live": guard.live,
            "silent": guard.stale,
            "expired": guard.expired,
            "acknowledged_by": guard.acked_by,
        }
    return json_response({"mass_expiry_guard": guard_view(guard)})
