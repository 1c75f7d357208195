"""Operator actions on one workspace (admin token): pause, resume, remove, rotate its token."""

from __future__ import annotations

import uuid

from aiohttp import web

from registry import validation as v
from registry.auth import hash_token, new_workspace_token
from registry.db import reconciles, transitions, workspaces
from registry.db.transitions import TransitionResult
from registry.errors import Conflict, workspace_not_found, workspace_removed
from registry.handlers.workspaces import workspace_response
from registry.jsonio import json_response
from registry.keys import METRICS, POOL
from registry.statuses import Status


def _count(request: web.Request, result: TransitionResult, to: Status, cause: str) -> None:
    if result.changed and result.previous is not None:
        request.app[METRICS].transitions.labels(result.previous.value, to.value, cause).inc()


def _check(result: TransitionResult, workspace_id: uuid.UUID, to: Status) -> None:
    if result.previous is None:
        raise workspace_not_found(workspace_id)
    if result.previous is Status.REMOVED and to is not Status.REMOVED:
        raise workspace_removed()
    if not result.changed and result.previous is not to:
        raise Conflict(
            f"workspace is {result.previous.value}; it cannot become {to.value}",
            code="illegal_transition",
        )


async def post_pause(request: web.Request) -> web.Response:
    """Hold the workspace: heartbeats are still recorded but never promote it."""
    workspace_id = v.path_uuid(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        result = await transitions.transition(
            conn, workspace_id, Status.PAUSED, cause="paused", actor="admin"
        )
        _check(result, workspace_id, Status.PAUSED)
    _count(request, result, Status.PAUSED, "paused")
    return await workspace_response(request, workspace_id)


async def post_resume(request: web.Request) -> web.Response:
    """Release the hold. The workspace is `offline` until its next heartbeat promotes it."""
    workspace_id = v.path_uuid(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        result = await transitions.transition(
            conn,
            workspace_id,
            Status.OFFLINE,
            cause="resumed",
            actor="admin",
            only_from=frozenset({Status.PAUSED}),
        )
        if result.previous not in (None, Status.REMOVED) and not result.changed:
            raise Conflict(f"workspace is {result.previous.value}, not paused", code="not_paused")
        _check(result, workspace_id, Status.OFFLINE)
    _count(request, result, Status.OFFLINE, "resumed")
    return await workspace_response(request, workspace_id)


async def delete_workspace(request: web.Request) -> web.Response:
    """Tombstone the workspace: its runtime gets 410 from now on; queued reconciles end."""
    workspace_id = v.path_uuid(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        result = await transitions.transition(
            conn, workspace_id, Status.REMOVED, cause="removed", actor="admin"
        )
        _check(result, workspace_id, Status.REMOVED)
        await reconciles.cancel_queued(conn, workspace_id, "workspace was removed")
    _count(request, result, Status.REMOVED, "removed")
    return web.Response(status=204)


async def post_token(request: web.Request) -> web.Response:
    """Issue a new workspace token; the old one stops working at once."""
    workspace_id = v.path_uuid(request)
    token = new_workspace_token()
    async with request.app[POOL].acquire() as conn:
        if not await workspaces.replace_token(conn, workspace_id, hash_token(token)):
            if await workspaces.workspace_exists(conn, workspace_id):
                raise workspace_removed()
            raise workspace_not_found(workspace_id)
    return json_response({"workspace_id": workspace_id, "token": token})
