"""The dashboard's routes: its static files, login, logout and who the session is."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from registry import auth
from registry import validation as v
from registry.db import ui_sessions
from registry.errors import InvalidField, NotFound
from registry.forwarded import request_scheme
from registry.jsonio import json_response
from registry.keys import POOL, SETTINGS
from registry.ui.sessions import COOKIE, SESSION_TTL_S, admin_check, new_session_id, session_key

# No inline script or style, nothing from another origin, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_STATIC = resources.files("registry.ui") / "static"


def _harden(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def _file(name: str) -> web.Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    # Only plain names of files the package ships: no path, no other file of the package.
    if suffix not in _TYPES or "/" in name or name.startswith("."):
        raise NotFound(f"no such dashboard file: {name}")
    resource = _STATIC / name
    if not resource.is_file():
        raise NotFound(f"no such dashboard file: {name}")
    body = resource.read_bytes()
    response = web.Response(body=body, content_type=_TYPES[suffix], charset="utf-8")
    _harden(response)
    return response


async def get_root(request: web.Request) -> web.Response:
    # No body: HTTPFound's "302: Found" text would be one more thing to document.
    return web.Response(status=302, headers={"Location": "/ui/"})


async def get_ui(request: web.Request) -> web.Response:
    return _file("index.html")


async def get_ui_asset(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


async def post_ui_login(request: web.Request) -> web.Response:
    auth.check_same_origin(request)
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, ("token",))
    token = v.required(body, "token")
    if not isinstance(token, str) or not token or len(token) > 512:
        raise InvalidField("token must be a non-empty string", field="token")
    principal = await auth.authenticate(request, token)
    session_id = new_session_id()
    key = session_key(session_id)
    lookup = auth.api_token_lookup(token)
    admin_token = request.app[SETTINGS].admin_token
    # The bootstrap admin has no token row to refer to: its session checks the token instead.
    bootstrap = principal.name == auth.BOOTSTRAP_ADMIN and admin_token is not None
    async with request.app[POOL].acquire() as conn:
        await ui_sessions.open_session(
            conn,
            id_hash=key,
            name=principal.name,
            role=principal.role.value,
            token_lookup=None if bootstrap else lookup,
            admin_check=admin_check(key, admin_token) if bootstrap and admin_token else None,
            ttl_s=SESSION_TTL_S,
        )
    response = json_response({"name": principal.name, "role": principal.role.value})
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="Strict",
        # Behind a trusted TLS-terminating proxy too (registry/forwarded.py).
        secure=request_scheme(request) == "https",
    )
    _harden(response)
    return response


async def post_ui_logout(request: web.Request) -> web.Response:
    auth.check_same_origin(request)
    session_id = request.cookies.get(COOKIE)
    if session_id:
        async with request.app[POOL].acquire() as conn:
            await ui_sessions.end_session(conn, session_key(session_id))
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    _harden(response)
    return response


async def get_ui_session(request: web.Request) -> web.Response:
    principal = request[auth.PRINCIPAL]
    response = json_response({"name": principal.name, "role": principal.role.value})
    _harden(response)
    return response
