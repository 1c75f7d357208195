"""Operator actions on one workspace (operate role): pause, resume, remove, rotate its token.
Each is audited: its event names the token as actor (registry/audit.py)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from registry import audit
from registry import validation as v
from registry.auth import actor, hash_token, new_workspace_token
from registry.db import Connection, reconciles, transitions, workspaces
from registry.db.transitions import TransitionResult
from registry.errors import Conflict, workspace_not_found, workspace_removed
from registry.handlers.workspaces import workspace_response
from registry.jsonio import json_response
from registry.keys import METRICS, POOL, SETTINGS
from registry.plugins.delivery import remove_workspace_from_filesystem
from registry.statuses import Status

log = logging.getLogger(__name__)


async def _operator_transition(
    request: web.Request,
    to: Status,
    cause: str,
    *,
    only_from: frozenset[Status] | None = None,
    also: Callable[[Connection, uuid.UUID], Awaitable[None]] | None = None,
) -> uuid.UUID:
    """Move the workspace of the path to `to` (idempotent when it is there already), run
    `also` in the same transaction, and count the change once it committed."""
    workspace_id = v.path_uuid(request)
    who = actor(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        # The status event is the audit event: it names the actor, in this transaction.
        result = await transitions.transition(
            conn, workspace_id, to, cause=cause, actor=who, only_from=only_from
        )
        _check(result, workspace_id, to, only_from)
        if also is not None:
            await also(conn, workspace_id)
    if result.changed and result.previous is not None:
        request.app[METRICS].transitions.labels(result.previous.value, to.value, cause).inc()
        detail = {"from": result.previous.value, "to": to.value}
        audit.log(audit.Entry(who, cause, workspace_id, detail))
    return workspace_id


def _check(
    result: TransitionResult,
    workspace_id: uuid.UUID,
    to: Status,
    only_from: frozenset[Status] | None,
) -> None:
    if result.previous is None:
        raise workspace_not_found(workspace_id)
    if result.previous is Status.REMOVED and to is not Status.REMOVED:
        raise workspace_removed()
    if result.changed or (result.previous is to and only_from is None):
        return
    if only_from is not None:
        allowed = sorted(s.value for s in only_from)
        raise Conflict(
            f"workspace is {result.previous.value}, not {' or '.join(allowed)}",
            code=f"not_{'_or_'.join(allowed)}",
        )
    raise Conflict(
        f"workspace is {result.previous.value}; it cannot become {to.value}",
        code="illegal_transition",
    )


async def post_pause(request: web.Request) -> web.Response:
    """Hold the workspace: heartbeats are still recorded but never promote it."""
    workspace_id = await _operator_transition(request, Status.PAUSED, "paused")
    return await workspace_response(request, workspace_id)


async def post_resume(request: web.Request) -> web.Response:
    """Release the hold. The workspace is `offline` until its next heartbeat promotes it."""
    workspace_id = await _operator_transition(
        request, Status.OFFLINE, "resumed", only_from=frozenset({Status.PAUSED})
    )
    return await workspace_response(request, workspace_id)


async def _end_queued_reconciles(conn: Connection, workspace_id: uuid.UUID) -> None:
    await reconciles.cancel_queued(conn, workspace_id, "workspace was removed")


async def delete_workspace(request: web.Request) -> web.Response:
    """Tombstone the workspace: its runtime gets 410 from now on; queued reconciles end;
    then, once the tombstone committed, its filesystem plugins directory goes."""
    workspace_id = await _operator_transition(
        request, Status.REMOVED, "removed", also=_end_queued_reconciles
    )
    await _remove_plugins_dir(request, workspace_id)
    return web.Response(status=204)


async def _remove_plugins_dir(request: web.Request, workspace_id: uuid.UUID) -> None:
    """Only after the commit: a delete that failed must leave the plugins where they were.
    A directory that cannot be removed does not undo the delete; it is logged to be swept."""
    try:
        await remove_workspace_from_filesystem(
            request.app[SETTINGS].resolved_plugins_dir, str(workspace_id)
        )
    except OSError as exc:
        log.warning(
            "workspace removed, but its plugins directory was not: %s",
            exc,
            extra={"workspace_id": str(workspace_id)},
        )


# A grace period longer than this is a token that never really rotates.
MAX_ROTATION_GRACE_S = 7 * 86400.0


async def post_token(request: web.Request) -> web.Response:
    """Issue a new workspace token; the old one keeps working for the grace period
    (`grace_s` in the body, else REGISTRY_TOKEN_ROTATION_GRACE_S; 0 for a leaked token)."""
    workspace_id = v.path_uuid(request)
    body = await v.read_optional_json_object(request)
    v.reject_unknown_fields(body, ("grace_s",))
    grace_s = v.number(
        body,
        "grace_s",
        request.app[SETTINGS].token_rotation_grace_s,
        minimum=0.0,
        maximum=MAX_ROTATION_GRACE_S,
    )
    token = new_workspace_token()
    who = actor(request)
    async with request.app[POOL].acquire() as conn:
        # One statement rotates and writes the `token_rotated` event with its actor.
        rotated = await workspaces.rotate_token(
            conn, workspace_id, hash_token(token), grace_s=grace_s, actor=who
        )
        if rotated is None:
            if await workspaces.workspace_exists(conn, workspace_id):
                raise workspace_removed()
            raise workspace_not_found(workspace_id)
    audit.log(
        audit.Entry(
            who,
            "token_rotated",
            workspace_id,
            {"grace_s": grace_s, "previous_token_valid_until": rotated.isoformat()},
        )
    )
    return json_response(
        {"workspace_id": workspace_id, "token": token, "previous_token_valid_until": rotated}
    )
