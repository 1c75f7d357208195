"""Management API: workspace labels (PATCH merges, PUT replaces) and lookup by name."""

from __future__ import annotations

import uuid

from aiohttp import web

from registry import audit
from registry import validation as v
from registry.auth import actor
from registry.db import Connection, workspaces
from registry.errors import Conflict, NotFound, workspace_not_found, workspace_removed
from registry.handlers.workspaces import workspace_response
from registry.keys import POOL
from registry.labels import MAX_LABELS, parse_labels, parse_patch


async def patch_workspace_labels(request: web.Request) -> web.Response:
    """`{"labels": {"k": "v", "gone": null}}`: sets k, removes gone, keeps the rest."""
    workspace_id = v.path_uuid(request)
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, ("labels",))
    sets, removes = parse_patch(v.required(body, "labels"))
    entry = audit.Entry(actor(request), "labels_set", workspace_id)
    async with audit.audited(request.app[POOL], entry) as conn:
        labels = await workspaces.merge_labels(conn, workspace_id, sets, removes)
        if labels is None:
            raise await _missing(conn, workspace_id)
        # Checked on the merged map inside the transaction: raising rolls the merge back. A
        # conflict with the labels it has (409), not a bad request: the same patch fits a
        # workspace with fewer.
        if len(labels) > MAX_LABELS:
            raise Conflict(
                f"the merge would leave {len(labels)} labels; a workspace has at most "
                f"{MAX_LABELS}: remove some in the same patch (null)",
                field="labels",
                code="too_many_labels",
            )
        entry.detail = {"labels": labels}
    return await workspace_response(request, workspace_id)


async def put_workspace_labels(request: web.Request) -> web.Response:
    """`{"labels": {...}}`: the complete new map."""
    workspace_id = v.path_uuid(request)
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, ("labels",))
    labels = parse_labels(v.required(body, "labels"))
    entry = audit.Entry(actor(request), "labels_set", workspace_id, {"labels": labels})
    async with audit.audited(request.app[POOL], entry) as conn:
        if await workspaces.replace_labels(conn, workspace_id, labels) is None:
            raise await _missing(conn, workspace_id)
    return await workspace_response(request, workspace_id)


async def _missing(conn: Connection, workspace_id: uuid.UUID) -> Exception:
    if await workspaces.workspace_exists(conn, workspace_id):
        return workspace_removed()
    return workspace_not_found(workspace_id)


async def get_workspace_by_name(request: web.Request) -> web.Response:
    """The live workspace of that name (names are unique among live workspaces)."""
    name = request.match_info["name"]
    # Names are at most 128 characters without NUL (checked at create): anything else names
    # no workspace, and PostgreSQL would refuse a NUL in text.
    workspace_id = None
    if len(name) <= 128 and "\x00" not in name:
        async with request.app[POOL].acquire() as conn:
            workspace_id = await workspaces.live_id_by_name(conn, name)
    if workspace_id is None:
        raise NotFound(f"no workspace named {name[:128]!r}", code="workspace_not_found")
    return await workspace_response(request, workspace_id)
