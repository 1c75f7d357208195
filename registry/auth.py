"""Bearer tokens: workspace tokens, named API tokens with a role, and the one route → role
table the gate enforces, failing closed (a route nobody classified needs `admin`)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from aiohttp import web

from registry.db import api_tokens, ui_sessions
from registry.errors import Forbidden, Handler, Unauthorized
from registry.forwarded import request_scheme
from registry.keys import POOL, SETTINGS
from registry.ui.sessions import COOKIE, admin_check, session_key

WORKSPACE_TOKEN_PREFIX = "rwt_"
API_TOKEN_PREFIX = "rat_"
# The non-secret handle of an API token (`rat_<lookup>_<secret>`): indexed, so finding the
# token is one index probe; the secret part is then checked by a constant-time comparison.
LOOKUP_HEX_CHARS = 16

# The actor of the configured REGISTRY_ADMIN_TOKEN, the bootstrap admin. Names the registry
# itself writes as actors are reserved too, so an event's actor always says who acted.
BOOTSTRAP_ADMIN = "admin"
RESERVED_ACTORS = frozenset({BOOTSTRAP_ADMIN, "registry", "reconciler", "sweeper", "runtime"})

# Routes anyone may call, and runtime routes that check the workspace token themselves (in
# the same statement that writes the heartbeat). Every other route needs an API token.
PUBLIC_ROUTES = frozenset(
    {"get_healthz", "get_readyz", "get_buildinfo", "get_openapi", "get_metrics"}
)
WORKSPACE_TOKEN_ROUTES = frozenset({"post_heartbeat", "post_register"})
# The dashboard's pages and its login/logout (issue 17): no token, since they are how a
# browser gets a session; login checks the token it is given, logout only ends a session.
UI_ROUTES = frozenset({"get_root", "get_ui", "get_ui_asset", "post_ui_login", "post_ui_logout"})


class Role(StrEnum):
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.READ: 0, Role.OPERATE: 1, Role.ADMIN: 2}

# What each token-checked route needs. A new route that is not listed here needs `admin`
# (required_role fails closed) until someone decides otherwise; tests/test_auth_matrix.py
# runs every route of the router against every role, so the table is tested as it grows.
# Creating a workspace is `operate`: provisioning scripts create and delete workspaces, and
# neither grants more than the other; only tokens (who may act) are `admin`.
ROUTE_ROLES: Mapping[str, Role] = MappingProxyType(
    {
        "get_workspaces": Role.READ,
        "get_workspace": Role.READ,
        "get_workspace_by_name": Role.READ,
        "get_workspace_events": Role.READ,
        "get_events": Role.READ,
        "get_event_history": Role.READ,
        "get_fleet": Role.READ,
        "get_fleet_history": Role.READ,
        "get_workspace_reconciles": Role.READ,
        "get_reconcile": Role.READ,
        "get_ui_session": Role.READ,
        "post_workspaces": Role.OPERATE,
        "put_workspace_plugins": Role.OPERATE,
        "patch_workspace_labels": Role.OPERATE,
        "put_workspace_labels": Role.OPERATE,
        "post_pause": Role.OPERATE,
        "post_resume": Role.OPERATE,
        "delete_workspace": Role.OPERATE,
        "post_token": Role.OPERATE,
        "post_workspace_reconcile": Role.OPERATE,
        "post_plugins_reconcile": Role.OPERATE,
        "post_guard_ack": Role.OPERATE,
        "post_tokens": Role.ADMIN,
        "get_tokens": Role.ADMIN,
        "delete_token": Role.ADMIN,
    }
)


def required_role(route_name: str) -> Role:
    """The role a token-checked route needs; `admin` for any route not classified."""
    return ROUTE_ROLES.get(route_name, Role.ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name (every event's `actor`) and its role."""

    name: str
    role: Role


PRINCIPAL = web.RequestKey("principal", Principal)


def actor(request: web.Request) -> str:
    """The name recorded as `actor` for what this request does."""
    return request[PRINCIPAL].name


class RoleRequired(Forbidden):
    """403 naming the role needed; API.md's envelope has no other field, so the message says
    it, in a fixed form (`needs the <role> role`)."""

    code = "role_required"

    def __init__(self, principal: Principal, needed: Role) -> None:
        super().__init__(
            f"this route needs the {needed.value} role; token {principal.name!r} is "
            f"{principal.role.value}"
        )


def new_workspace_token() -> str:
    return WORKSPACE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_api_token() -> tuple[str, str]:
    """(lookup, token): the token is shown once; the lookup and the token's hash are kept."""
    lookup = secrets.token_hex(LOOKUP_HEX_CHARS // 2)
    return lookup, f"{API_TOKEN_PREFIX}{lookup}_{secrets.token_urlsafe(32)}"


def api_token_lookup(token: str) -> str | None:
    """The lookup part of something shaped like an API token, else None."""
    if not token.startswith(API_TOKEN_PREFIX):
        return None
    rest = token[len(API_TOKEN_PREFIX) :]
    lookup, sep, secret = (
        rest[:LOOKUP_HEX_CHARS],
        rest[LOOKUP_HEX_CHARS : LOOKUP_HEX_CHARS + 1],
        rest[LOOKUP_HEX_CHARS + 1 :],
    )
    if len(lookup) != LOOKUP_HEX_CHARS or sep != "_" or not secret:
        return None
    if lookup.strip("0123456789abcdef"):
        return None
    return lookup


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


async def authenticate(request: web.Request, token: str) -> Principal:
    """The bootstrap admin (no database needed), else a live API token (one index probe)."""
    admin_token = request.app[SETTINGS].admin_token
    if admin_token is not None and is_admin_token(token, admin_token):
        return Principal(BOOTSTRAP_ADMIN, Role.ADMIN)
    lookup = api_token_lookup(token)
    if lookup is None:
        raise Unauthorized("an API token or the admin token is required")
    async with request.app[POOL].acquire() as conn:
        found = await api_tokens.find_by_lookup(conn, lookup)
    if found is None or not hmac.compare_digest(found.token_hash, hash_token(token)):
        raise Unauthorized("an API token or the admin token is required")
    # Told apart only once the whole token matched: only its holder learns why.
    if found.revoked:
        raise Unauthorized(f"token {found.name!r} was revoked", code="token_revoked")
    if found.expired:
        raise Unauthorized(f"token {found.name!r} has expired", code="token_expired")
    return Principal(found.name, Role(found.role))


class CrossOrigin(Forbidden):
    code = "cross_origin"


# Methods a browser may send cross-site without asking (SameSite aside): they change nothing.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_same_origin(request: web.Request) -> None:
    """CSRF: a cookie-authenticated change must come from a page of this very origin. Browsers
    send Origin with every POST/PUT/PATCH/DELETE, so a missing one is refused too. Behind a
    trusted TLS-terminating proxy the origin is https (registry/forwarded.py)."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    if origin != f"{request_scheme(request)}://{request.host}":
        raise CrossOrigin("a browser session may only change things from this origin's pages")


async def session_principal(request: web.Request, session_id: str) -> Principal:
    """The principal of a dashboard session (one probe, which also reads its token's state):
    a token revoked or expired since the login ends the session, as does a change of the
    bootstrap admin token for the sessions it opened."""
    key = session_key(session_id)
    async with request.app[POOL].acquire() as conn:
        session = await ui_sessions.find_session(conn, key)
        if session is None:
            raise Unauthorized("the session has ended; log in again", code="session_ended")
        if session.token_dead or not _admin_check_holds(request, key, session.admin_check):
            await ui_sessions.end_session(conn, key)
            raise Unauthorized("the session's token is no longer valid", code="session_ended")
    check_same_origin(request)
    return Principal(session.name, Role(session.role))


def _admin_check_holds(request: web.Request, key: bytes, check: bytes | None) -> bool:
    if check is None:
        return True  # opened with an API token, whose state the probe read
    admin_token = request.app[SETTINGS].admin_token
    return admin_token is not None and hmac.compare_digest(check, admin_check(key, admin_token))


async def caller(request: web.Request) -> Principal:
    """A Bearer token when one is sent (never subject to the Origin check), else the
    dashboard's session cookie, else 401."""
    session_id = request.cookies.get(COOKIE)
    if "Authorization" not in request.headers and session_id:
        return await session_principal(request, session_id)
    return await authenticate(request, bearer_token(request))


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The gate of every token-checked route: who calls (PRINCIPAL), and whether their role
    is the one required_role() names for the route."""
    name = request.match_info.route.name
    if name in PUBLIC_ROUTES or name in WORKSPACE_TOKEN_ROUTES or name in UI_ROUTES or name is None:
        # name None: no route matched; the router answers 404/405 without touching anything.
        return await handler(request)
    principal = await caller(request)
    needed = required_role(name)
    if not principal.role.allows(needed):
        raise RoleRequired(principal, needed)
    request[PRINCIPAL] = principal
    return await handler(request)
