"""Internal reconcile API: request (audited), fan out (audited) and inspect reconcile runs."""

from __future__ import annotations

from aiohttp import web

from registry import audit, query
from registry import validation as v
from registry.auth import actor
from registry.db import reconciles, workspaces
from registry.errors import Conflict, InvalidField, NotFound, workspace_not_found
from registry.handlers.workspaces import lock_existing_workspace
from registry.jsonio import json_response
from registry.keys import POOL, RECONCILER, SOURCES
from registry.plugins import PluginError, parse_source
from registry.statuses import LIVE, LIVE_STATUSES
from registry.views import reconcile_view

MAX_LIST_LIMIT = 100


async def post_workspace_reconcile(request: web.Request) -> web.Response:
    workspace_id = v.path_uuid(request)
    body = await v.read_optional_json_object(request)
    v.reject_unknown_fields(body, ("refresh",))
    refresh = body.get("refresh")
    refresh = False if refresh is None else refresh
    if not isinstance(refresh, bool):
        raise InvalidField("refresh must be a boolean", field="refresh")
    entry = audit.Entry(actor(request), "reconcile_requested", workspace_id)
    async with request.app[POOL].acquire() as conn:
        async with conn.transaction():
            status = await lock_existing_workspace(conn, workspace_id)
            if status not in LIVE:
                raise Conflict(
                    f"workspace is {status}; only online or degraded workspaces are reconciled",
                    code="workspace_not_live",
                )
            requested = await reconciles.request_reconcile(conn, workspace_id, refresh=refresh)
            entry.detail = {
                "reconcile_id": str(requested.reconcile_id),
                "refresh": refresh,
                "created": requested.created,
            }
            await audit.record(conn, entry)
        run = await reconciles.get_reconcile(conn, requested.reconcile_id)
    audit.log(entry)
    assert run is not None
    # A queued run the request folded into is due now, like a new one.
    if requested.created or run.status == "queued":
        request.app[RECONCILER].wake()
    return json_response(
        {"reconcile": reconcile_view(run)}, status=202 if requested.created else 200
    )


async def post_plugins_reconcile(request: web.Request) -> web.Response:
    """Every live workspace declaring this plugin (by source or by name) is refreshed."""
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, ("source", "name"))
    raw_source = v.text(body, "source", "", max_length=2048) or None
    name = v.text(body, "name", "", max_length=64) or None
    if (raw_source is None) == (name is None):
        raise InvalidField("give exactly one of source or name", field="source")
    source = None
    if raw_source is not None:
        try:
            source = parse_source(raw_source, request.app[SOURCES]).raw
        except PluginError as exc:
            raise InvalidField(exc.message, field="source", code=exc.code) from None
    entry = audit.Entry(actor(request), "plugins_reconcile_fanned_out")
    async with audit.audited(request.app[POOL], entry) as conn:
        queued = await reconciles.fan_out_reconciles(
            conn, source=source, name=name, live_statuses=LIVE_STATUSES
        )
        entry.detail = {"source": source, "name": name, "queued": queued}
        entry.changed = queued > 0
    if queued:
        request.app[RECONCILER].wake()
    return json_response({"queued": queued}, status=202)


async def get_reconcile(request: web.Request) -> web.Response:
    reconcile_id = v.path_uuid(request, "reconcile")
    async with request.app[POOL].acquire() as conn:
        run = await reconciles.get_reconcile(conn, reconcile_id)
    if run is None:
        raise NotFound(f"no reconcile {reconcile_id}", code="reconcile_not_found")
    return json_response(reconcile_view(run))


async def get_workspace_reconciles(request: web.Request) -> web.Response:
    workspace_id = v.path_uuid(request)
    limit = query.query_int(request, "limit", 20, minimum=1, maximum=MAX_LIST_LIMIT)
    async with request.app[POOL].acquire() as conn:
        if not await workspaces.workspace_exists(conn, workspace_id):
            raise workspace_not_found(workspace_id)
        runs = await reconciles.reconciles_for_workspace(conn, workspace_id, limit)
    return json_response({"reconciles": [reconcile_view(run) for run in runs]})
