"""Named API tokens (admin role): create (the secret is shown once), list, revoke."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from registry import audit, query
from registry import validation as v
from registry.auth import RESERVED_ACTORS, Role, actor, hash_token, new_api_token
from registry.db import api_tokens, ui_sessions
from registry.db.api_tokens import ApiToken, NameTaken
from registry.errors import Conflict, InvalidField, NotFound
from registry.jsonio import json_response
from registry.keys import POOL

# A token's name is every event's `actor`: short, plain, and never one the registry uses.
TOKEN_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
CREATE_FIELDS = ("name", "role", "expires_at")


def token_view(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "created_at": token.created_at,
        "created_by": token.created_by,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "revoked_by": token.revoked_by,
    }


def _name(body: v.Body) -> str:
    name = v.text(body, "name", "", max_length=63)
    if not name:
        raise InvalidField("name is required", field="name", code="missing_field")
    if not TOKEN_NAME.match(name):
        raise InvalidField(
            "name must be 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
            field="name",
        )
    if name in RESERVED_ACTORS:
        raise InvalidField(f"{name!r} is reserved for the registry's own actors", field="name")
    if isinstance(_token_ref(name), uuid.UUID):
        # DELETE /tokens/{id or name} reads a UUID as an id: a name must never look like one.
        raise InvalidField("name must not be a UUID (tokens have ids)", field="name")
    return name


def _expires_at(body: v.Body) -> datetime | None:
    if body.get("expires_at") is None:
        return None
    raw = v.text(body, "expires_at", "", max_length=64)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidField("expires_at must be an RFC 3339 time", field="expires_at") from None
    if when.tzinfo is None:
        raise InvalidField("expires_at needs a UTC offset (e.g. Z)", field="expires_at")
    if when <= datetime.now(UTC):
        raise InvalidField("expires_at must be in the future", field="expires_at")
    return when


async def post_tokens(request: web.Request) -> web.Response:
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, CREATE_FIELDS)
    name = _name(body)
    v.required(body, "role")
    role = v.choice(body, "role", "", [r.value for r in Role])
    expires_at = _expires_at(body)
    lookup, secret = new_api_token()
    entry = audit.Entry(actor(request), "api_token_created", None, {"name": name, "role": role})
    try:
        async with audit.audited(request.app[POOL], entry) as conn:
            token = await api_tokens.create_token(
                conn,
                name=name,
                role=role,
                lookup=lookup,
                token_hash=hash_token(secret),
                created_by=entry.actor,
                expires_at=expires_at,
            )
            entry.detail |= {"token_id": str(token.id), "expires_at": _iso(expires_at)}
    except NameTaken:
        raise Conflict(
            f"a token named {name!r} exists; revoke it first", code="already_exists"
        ) from None
    # The only time the secret is shown: only its hash is kept.
    return json_response({"token": token_view(token), "secret": secret}, status=201)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


async def get_tokens(request: web.Request) -> web.Response:
    include_revoked = query.query_bool(request, "include_revoked")
    async with request.app[POOL].acquire() as conn:
        tokens = await api_tokens.list_tokens(conn, include_revoked=include_revoked)
    return json_response({"tokens": [token_view(t) for t in tokens]})


def _token_ref(raw: str) -> uuid.UUID | str:
    """An id, or a name; anything else (a NUL byte, say) names no token and never reaches the
    database."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        if not TOKEN_NAME.match(raw):
            raise NotFound(f"no token {raw!r}", code="token_not_found") from None
        return raw


async def delete_token(request: web.Request) -> web.Response:
    """Revoke by id or by name; it stops working at once (every request checks it).
    Revoking a revoked token is a no-op (204, no event), as removing a removed workspace is."""
    ref = _token_ref(request.match_info["id"])
    entry = audit.Entry(actor(request), "api_token_revoked")
    async with audit.audited(request.app[POOL], entry) as conn:
        token = await api_tokens.revoke_token(conn, ref, entry.actor)
        if token is None:
            entry.changed = False
            if not await api_tokens.was_revoked(conn, ref):
                raise NotFound(f"no token {ref}", code="token_not_found")
        else:
            # Its dashboard sessions end with it (each request checks the token as well).
            ended = await ui_sessions.end_token_sessions(conn, token.id)
            entry.detail = {
                "token_id": str(token.id),
                "name": token.name,
                "role": token.role,
                "sessions_ended": ended,
            }
    return web.Response(status=204)
