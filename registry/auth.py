"""Bearer tokens: issuing and hashing workspace tokens, and the admin gate that fails closed."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from registry.errors import Handler, Unauthorized
from registry.keys import SETTINGS

WORKSPACE_TOKEN_PREFIX = "rwt_"

# Routes anyone may call, and runtime routes that check the workspace token themselves (in
# the same statement that writes the heartbeat). Every other route needs the admin token.
PUBLIC_ROUTES = frozenset(
    {"get_healthz", "get_readyz", "get_buildinfo", "get_openapi", "get_metrics"}
)
WORKSPACE_TOKEN_ROUTES = frozenset({"post_heartbeat", "post_register"})


def new_workspace_token() -> str:
    return WORKSPACE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is enough; no salt is needed to stop
    # dictionary attacks on values nobody chose. Lookups compare hashes, never tokens: an
    # attacker cannot steer the bytes of a hash, so a timing difference there reveals nothing.
    return hashlib.sha256(token.encode()).digest()


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    # Tokens are printable ASCII; anything else (e.g. bytes that are not UTF-8) matches nothing.
    if (
        scheme.lower() != "bearer"
        or not token
        or len(token) > 512
        or not (token.isascii() and token.isprintable())
    ):
        raise Unauthorized("missing or malformed Authorization: Bearer <token>")
    return token


def is_admin_token(token: str, admin_token: str) -> bool:
    return hmac.compare_digest(hash_token(token), hash_token(admin_token))


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    name = request.match_info.route.name
    if name in PUBLIC_ROUTES or name in WORKSPACE_TOKEN_ROUTES or name is None:
        # name None: no route matched; the router answers 404/405 without touching anything.
        return await handler(request)
    admin_token = request.app[SETTINGS].admin_token
    if admin_token is None or not is_admin_token(bearer_token(request), admin_token):
        raise Unauthorized("admin token required")
    return await handler(request)
