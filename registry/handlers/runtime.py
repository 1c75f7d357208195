"""Runtime API: heartbeat and register, authenticated by the workspace's own token."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from registry import validation as v
from registry.auth import bearer_token, hash_token
from registry.db.errors import DatabaseUnavailable
from registry.db.heartbeats import Beat, BeatResult, token_owner
from registry.errors import (
    CLIENT_GONE_STATUS,
    ApiError,
    Forbidden,
    Gone,
    InvalidField,
    Unauthorized,
    client_gone,
)
from registry.jsonio import json_response
from registry.keys import (
    IGNORED_FIELDS,
    INGEST,
    METRICS,
    POOL,
    RECONCILER,
    REFUSALS,
    SETTINGS,
)
from registry.statuses import Health, Status, classify_heartbeat

HEARTBEAT_FIELDS = frozenset(
    {
        "workspace_id",
        "error_rate",
        "sample_error",
        "active_tasks",
        "uptime_seconds",
        "current_task",
        "monthly_spend",
        "runtime_state",
        "plugins",
        "acks",
    }
)
REGISTER_FIELDS = frozenset({"workspace_id", "id", "url", "agent_card", "instance_id"})

# Bounds that no real runtime reaches; they keep garbage and abuse out of the table.
MAX_OBSERVED_PLUGINS = 500
MAX_ACKS = 100
MAX_AGENT_CARD_BYTES = 32 * 1024


PLUGIN_FIELDS = frozenset({"name", "sha"})


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated beat and the unknown fields the tolerant reader ignored (`plugins.x`
    for a field inside an item of `plugins`)."""

    beat: Beat
    ignored: list[str]


def _observed_plugins(body: v.Body, ignored: list[str]) -> list[dict[str, str]] | None:
    items = v.array(body, "plugins", max_items=MAX_OBSERVED_PLUGINS)
    if items is None:
        return None
    observed = []
    for item in items:
        entry = v.item_object(item, "plugins")
        for name in v.unknown_fields(entry, PLUGIN_FIELDS):
            if f"plugins.{name}" not in ignored:
                ignored.append(f"plugins.{name}")
        observed.append(
            {
                "name": v.text(entry, "name", "", max_length=128) or _missing("plugins"),
                "sha": v.text(entry, "sha", "", max_length=128),
            }
        )
    return observed


def _missing(field: str) -> str:
    raise InvalidField(f"each item of {field} needs a name", field=field)


def _acks(body: v.Body) -> list[uuid.UUID]:
    items = v.array(body, "acks", max_items=MAX_ACKS) or []
    return [v.parse_uuid(item, "acks") for item in items]


def parse_heartbeat(body: v.Body, token_hash: bytes) -> Parsed:
    # Liberal in what it accepts: unknown fields are ignored (and reported), known ones are
    # validated exactly; one field of version skew must not take a fleet down.
    ignored = v.unknown_fields(body, HEARTBEAT_FIELDS)
    error_rate = v.number(body, "error_rate", 0.0, minimum=0.0, maximum=1.0)
    runtime_state = v.text(body, "runtime_state", "ok", max_length=64)
    beat = Beat(
        workspace_id=v.parse_uuid(v.required(body, "workspace_id"), "workspace_id"),
        token_hash=token_hash,
        health=classify_heartbeat(error_rate, runtime_state),
        error_rate=error_rate,
        sample_error=v.text(body, "sample_error", "", max_length=4096),
        active_tasks=v.integer(
            body, "active_tasks", 0, minimum=0, maximum=1_000_000, integral_floats=True
        ),
        # Not reported: the stored uptime stays, so a beat that omits it is not a restart.
        uptime_seconds=v.number(body, "uptime_seconds", None, minimum=0.0, maximum=1e10),
        current_task=v.text(body, "current_task", "", max_length=1024),
        monthly_spend=v.number(body, "monthly_spend", 0.0, minimum=0.0, maximum=1e12),
        runtime_state=runtime_state,
        observed_plugins=_observed_plugins(body, ignored),
        acks=_acks(body),
    )
    return Parsed(beat, ignored)


def _register_workspace_id(body: v.Body) -> uuid.UUID:
    """`workspace_id`, or its alias `id` (older runtimes send that); both must agree."""
    workspace_id = body.get("workspace_id")
    alias = body.get("id")
    if workspace_id is None and alias is not None:
        return v.parse_uuid(alias, "id")
    parsed = v.parse_uuid(v.required(body, "workspace_id"), "workspace_id")
    if alias is not None and v.parse_uuid(alias, "id") != parsed:
        raise InvalidField("id and workspace_id name different workspaces", field="id")
    return parsed


def parse_register(body: v.Body, token_hash: bytes) -> Parsed:
    ignored = v.unknown_fields(body, REGISTER_FIELDS)
    url = v.http_url(body, "url")
    agent_card = body.get("agent_card")
    if agent_card is not None and not isinstance(agent_card, dict):
        raise InvalidField("agent_card must be an object", field="agent_card")
    if agent_card is not None:
        try:
            encoded = orjson.dumps(agent_card)
        except (orjson.JSONEncodeError, TypeError):
            # orjson reads deeper nesting than it writes; such a card cannot be stored.
            raise InvalidField("agent_card is nested too deeply", field="agent_card") from None
        if len(encoded) > MAX_AGENT_CARD_BYTES:
            raise InvalidField("agent_card is too large", field="agent_card")
        if b"\\u0000" in encoded:
            # PostgreSQL's jsonb cannot hold NUL characters.
            raise InvalidField("agent_card must not contain NUL characters", field="agent_card")
    beat = Beat(
        workspace_id=_register_workspace_id(body),
        token_hash=token_hash,
        # Registering says "I am up" but nothing of health: promote, keep degraded degraded.
        health=Health.UNWELL,
        error_rate=None,
        sample_error=None,
        active_tasks=None,
        uptime_seconds=None,
        current_task=None,
        monthly_spend=None,
        runtime_state=None,
        observed_plugins=None,
        acks=[],
        url=url,
        agent_card=agent_card,
        # Empty or absent: this runtime does not say which box it is; the stored id stays.
        instance_id=v.text(body, "instance_id", "", max_length=256) or None,
        cause="register",
    )
    return Parsed(beat, ignored)


async def _answer(request: web.Request, parsed: Parsed, kind: str) -> web.Response:
    app = request.app
    beat = parsed.beat
    if parsed.ignored:
        app[IGNORED_FIELDS].report(kind, beat.workspace_id, parsed.ignored)
    result = await app[INGEST].apply(beat)
    if result.previous_status is None:
        async with app[POOL].acquire() as conn:
            owner = await token_owner(conn, beat.token_hash)
        if owner is None:
            # Shown on the workspace the body names, as unauthenticated: a runtime with a
            # wrong token is visible there (at one write per flush, whoever sends it).
            app[REFUSALS].record(beat.workspace_id, 401, Unauthorized.code, None)
            raise Unauthorized("the token matches no workspace")
        if owner.token == "rotated":
            raise Unauthorized(
                "the token was rotated and its grace period is over: use the new token",
                code="token_rotated",
            )
        raise Forbidden("the token belongs to another workspace", field="workspace_id")
    if result.previous_status is Status.REMOVED:
        raise Gone("the workspace was removed: stop heartbeating")
    if result.status is not None and result.status is not result.previous_status:
        app[METRICS].transitions.labels(
            result.previous_status.value, result.status.value, beat.cause
        ).inc()
    if result.reconcile_queued:
        app[RECONCILER].wake()
    return json_response(_response_body(request, parsed, result))


def _response_body(request: web.Request, parsed: Parsed, result: BeatResult) -> dict[str, Any]:
    interval = request.app[SETTINGS].heartbeat_interval_s
    # ±10% jitter spreads a fleet that started together across the interval.
    next_heartbeat_s = round(interval * random.uniform(0.9, 1.1), 1)  # noqa: S311
    assert result.status is not None and result.previous_status is not None
    return {
        "workspace_id": parsed.beat.workspace_id,
        "status": result.status.value,
        "previous_status": result.previous_status.value,
        "next_heartbeat_s": next_heartbeat_s,
        "actions": result.actions,
        "ignored_fields": parsed.ignored,
        # The previous token still works, for its grace period only: fetch the new one.
        "token_rotated": result.old_token,
    }


async def _observed(
    request: web.Request, kind: str, parse: Callable[[v.Body, bytes], Parsed]
) -> web.Response:
    metrics = request.app[METRICS]
    started = time.perf_counter()
    code, outcome = 500, "error"
    token_hash: bytes | None = None
    try:
        token_hash = hash_token(bearer_token(request))
        parsed = parse(await v.read_json_object(request), token_hash)
        # Unknown query parameters too, reported as `?name` beside the body's fields.
        parsed.ignored.extend(f"?{name}" for name in sorted(set(request.query)))
        response = await _answer(request, parsed, kind)
        code, outcome = 200, "ok"
        return response
    except ApiError as exc:
        code, outcome = exc.status, exc.code
        if token_hash is not None and _is_refusal(exc):
            request.app[REFUSALS].record(token_hash, exc.status, exc.code, exc.field)
        raise
    except DatabaseUnavailable:
        code, outcome = 503, "database_unavailable"
        raise
    except Exception as exc:
        if client_gone(request, exc):
            # It hung up (mid-body, say): its own outcome, not an error of the registry.
            code, outcome = CLIENT_GONE_STATUS, "client_gone"
        raise
    except asyncio.CancelledError:
        if request.transport is None:  # cancelled because it hung up (handler_cancellation)
            code, outcome = CLIENT_GONE_STATUS, "client_gone"
        raise
    finally:
        metrics.heartbeats_by.get(kind, outcome, str(code)).inc()
        metrics.heartbeat_seconds_by.get(kind).observe(time.perf_counter() - started)


def _is_refusal(exc: ApiError) -> bool:
    """A refusal of a runtime whose token may identify its workspace: not a server-side
    failure (5xx), and not a token that was already found to match no workspace."""
    return exc.status < 500 and exc.code != Unauthorized.code


async def post_heartbeat(request: web.Request) -> web.Response:
    return await _observed(request, "heartbeat", parse_heartbeat)


async def post_register(request: web.Request) -> web.Response:
    return await _observed(request, "register", parse_register)
