"""A catalogue of hostile requests, for every route: each gets the right 4xx JSON error and
changes no state (every row of every state table and the number of events are compared).

Extends test_errors.py and test_openapi.py's request-schema cases rather than repeating them:
malformed bodies on every body route, numbers at the edges of floating point, over-long
strings, oversize bodies (also chunked), bad ids in paths and query strings, hostile plugin
sources (traversal, option-like refs, non-allowlisted hosts, symlinked directories), and
hostile plugin trees met at reconcile time (symlinks, swaps, oversize trees).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import MakeRegistry
from tests.hostile_support import (
    Route,
    World,
    assert_error,
    diff,
    make_world,
    router_routes,
    shared_registry,
    state,
)
from tests.support import ADMIN, Registry, Workspace, git, make_git_repo, write_tree

BODY_ROUTES = (
    "post_heartbeat",
    "post_register",
    "post_workspaces",
    "put_workspace_plugins",
    "post_workspace_reconcile",
    "post_plugins_reconcile",
)
ID_ROUTES = (
    "get_workspace",
    "delete_workspace",
    "post_pause",
    "post_resume",
    "post_token",
    "get_workspace_events",
    "put_workspace_plugins",
    "post_workspace_reconcile",
    "get_workspace_reconciles",
    "get_reconcile",
)


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def shared(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    async with shared_registry(dsn, tmp_path_factory.mktemp("hostile")) as registry:
        yield registry


def sources_of(registry: Registry) -> Path:
    return registry.settings.data_dir.parent / "sources"


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def world(shared: Registry) -> World:
    return await make_world(shared, sources_of(shared))


def route_named(world: World, name: str) -> Route:
    (route,) = [r for r in router_routes(world.registry) if r.name == name]
    return route


def auth_for(world: World, route: Route) -> dict[str, str]:
    """The right credentials, so that only the hostile part of the request can be at fault."""
    if route.name in ("post_heartbeat", "post_register"):
        return world.online.auth
    return ADMIN


async def send(
    world: World,
    name: str,
    *,
    body: Any = None,
    data: Any = None,
    path: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    route = route_named(world, name)
    return await world.registry.client.request(
        route.method,
        path or world.fill(route),
        json=body,
        data=data,
        headers=headers if headers is not None else auth_for(world, route),
    )


# --- 1. bodies that are not a JSON object, on every route that reads one --------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("malformed", b"{not json"),
    ("truncated", b'{"workspace_id": "x", "plugins": [{"source": "'),
    ("trailing-garbage", b"{} {}"),
    ("nan-literal", b'{"error_rate": NaN}'),
    ("infinity-literal", b'{"error_rate": Infinity}'),
    ("minus-infinity-literal", b'{"error_rate": -Infinity}'),
    ("float-overflow-1e400", b'{"error_rate": 1e400}'),
    ("integer-overflow-10e400", b'{"active_tasks": 1' + b"0" * 400 + b"}"),
    ("single-quotes", b"{'name': 'x'}"),
    ("comment", b"{/* hi */}"),
    ("byte-order-mark", b"\xef\xbb\xbf{}"),
    ("invalid-utf8", b'{"name": "\xff\xfe"}'),
    ("lone-surrogate-escape", b'{"name": "\\ud800"}'),
    ("nested-5000-deep", b"[" * 5000 + b"]" * 5000),
    ("json-array", b"[]"),
    ("json-string", b'"{}"'),
    ("json-number", b"42"),
    ("json-null", b"null"),
    ("json-true", b"true"),
    ("empty", b""),
]


async def _chunks(size: int) -> AsyncIterator[bytes]:
    yield b'{"name": "'
    sent = 0
    while sent < size:
        yield b"x" * 8192
        sent += 8192
    yield b'"}'


# --- 2. wrong types, edge numbers, over-long strings, unknown fields: field by field --------

W = "<workspace id>"  # replaced by the online workspace's id
S = "<allowed source>"  # replaced by an allowlisted plugin directory


def fill(value: Any, world: World) -> Any:
    if value == W:
        return world.online.id
    if value == S:
        return world.allowed_source
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, world) for v in value]
    return value


def bad(
    name: str, label: str, body: dict[str, Any], status: int, code: str, field: str | None
) -> Any:
    return pytest.param(name, body, status, code, field, id=f"{name}-{label}")


FIELD_CASES = [
    # Heartbeat (test_errors.py covers NaN, range, strings, NUL, acks basics).
    bad(
        "post_heartbeat",
        "rate-1e308",
        {"workspace_id": W, "error_rate": 1e308},
        400,
        "invalid_field",
        "error_rate",
    ),
    bad(
        "post_heartbeat",
        "rate-minus-1e308",
        {"workspace_id": W, "error_rate": -1e308},
        400,
        "invalid_field",
        "error_rate",
    ),
    bad(
        "post_heartbeat",
        "uptime-1e308",
        {"workspace_id": W, "uptime_seconds": 1e308},
        400,
        "invalid_field",
        "uptime_seconds",
    ),
    bad(
        "post_heartbeat",
        "uptime-negative",
        {"workspace_id": W, "uptime_seconds": -1},
        400,
        "invalid_field",
        "uptime_seconds",
    ),
    bad(
        "post_heartbeat",
        "spend-1e308",
        {"workspace_id": W, "monthly_spend": 1e308},
        400,
        "invalid_field",
        "monthly_spend",
    ),
    bad(
        "post_heartbeat",
        "spend-string",
        {"workspace_id": W, "monthly_spend": "1"},
        400,
        "invalid_field",
        "monthly_spend",
    ),
    bad(
        "post_heartbeat",
        "tasks-minus-10e30",
        {"workspace_id": W, "active_tasks": -(10**30)},
        400,
        "invalid_field",
        "active_tasks",
    ),
    bad(
        "post_heartbeat",
        "tasks-2e63",
        {"workspace_id": W, "active_tasks": 2**63},
        400,
        "invalid_field",
        "active_tasks",
    ),
    bad(
        "post_heartbeat",
        "tasks-bool",
        {"workspace_id": W, "active_tasks": True},
        400,
        "invalid_field",
        "active_tasks",
    ),
    bad(
        "post_heartbeat",
        "tasks-1e308",
        {"workspace_id": W, "active_tasks": 1e308},
        400,
        "invalid_field",
        "active_tasks",
    ),
    bad(
        "post_heartbeat",
        "workspace-id-empty",
        {"workspace_id": ""},
        400,
        "invalid_field",
        "workspace_id",
    ),
    bad(
        "post_heartbeat",
        "workspace-id-array",
        {"workspace_id": [W]},
        400,
        "invalid_field",
        "workspace_id",
    ),
    bad(
        "post_heartbeat",
        "workspace-id-object",
        {"workspace_id": {"id": W}},
        400,
        "invalid_field",
        "workspace_id",
    ),
    bad(
        "post_heartbeat",
        "workspace-id-sql",
        {"workspace_id": "' OR 1=1 --"},
        400,
        "invalid_field",
        "workspace_id",
    ),
    bad(
        "post_heartbeat",
        "workspace-id-nil-uuid",
        {"workspace_id": str(uuid.UUID(int=0))},
        403,
        "forbidden",
        "workspace_id",
    ),
    bad(
        "post_heartbeat",
        "state-object",
        {"workspace_id": W, "runtime_state": {}},
        400,
        "invalid_field",
        "runtime_state",
    ),
    bad(
        "post_heartbeat",
        "state-65",
        {"workspace_id": W, "runtime_state": "w" * 65},
        400,
        "invalid_field",
        "runtime_state",
    ),
    bad(
        "post_heartbeat",
        "sample-number",
        {"workspace_id": W, "sample_error": 1},
        400,
        "invalid_field",
        "sample_error",
    ),
    bad(
        "post_heartbeat",
        "task-list",
        {"workspace_id": W, "current_task": ["x"]},
        400,
        "invalid_field",
        "current_task",
    ),
    bad(
        "post_heartbeat",
        "task-1mb-of-emoji",
        {"workspace_id": W, "current_task": "😀" * 1025},
        400,
        "invalid_field",
        "current_task",
    ),
    bad(
        "post_heartbeat",
        "plugin-item-string",
        {"workspace_id": W, "plugins": ["seo"]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "post_heartbeat",
        "plugin-item-null",
        {"workspace_id": W, "plugins": [None]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "post_heartbeat",
        "plugin-name-129",
        {"workspace_id": W, "plugins": [{"name": "n" * 129}]},
        400,
        "invalid_field",
        "name",
    ),
    bad(
        "post_heartbeat",
        "plugin-sha-129",
        {"workspace_id": W, "plugins": [{"name": "a", "sha": "f" * 129}]},
        400,
        "invalid_field",
        "sha",
    ),
    bad(
        "post_heartbeat",
        "plugin-name-nul",
        {"workspace_id": W, "plugins": [{"name": "a\x00"}]},
        400,
        "invalid_field",
        "name",
    ),
    bad(
        "post_heartbeat",
        "plugin-name-number",
        {"workspace_id": W, "plugins": [{"name": 1}]},
        400,
        "invalid_field",
        "name",
    ),
    bad(
        "post_heartbeat",
        "acks-string",
        {"workspace_id": W, "acks": "x"},
        400,
        "invalid_field",
        "acks",
    ),
    bad(
        "post_heartbeat",
        "acks-null-item",
        {"workspace_id": W, "acks": [None]},
        400,
        "invalid_field",
        "acks",
    ),
    bad(
        "post_heartbeat",
        "acks-number-item",
        {"workspace_id": W, "acks": [1]},
        400,
        "invalid_field",
        "acks",
    ),
    # Register.
    bad(
        "post_register",
        "workspace-id-missing",
        {"url": "http://x"},
        400,
        "missing_field",
        "workspace_id",
    ),
    bad(
        "post_register",
        "url-javascript",
        {"workspace_id": W, "url": "javascript:alert(1)"},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_register",
        "url-file",
        {"workspace_id": W, "url": "file:///etc/passwd"},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_register",
        "url-nul",
        {"workspace_id": W, "url": "http://a\x00b"},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_register",
        "url-list",
        {"workspace_id": W, "url": ["http://x"]},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_register",
        "card-number",
        {"workspace_id": W, "agent_card": 1},
        400,
        "invalid_field",
        "agent_card",
    ),
    bad(
        "post_register",
        "card-nul-deep",
        {"workspace_id": W, "agent_card": {"a": [{"b": "\x00"}]}},
        400,
        "invalid_field",
        "agent_card",
    ),
    # Create.
    bad("post_workspaces", "name-129", {"name": "n" * 129}, 400, "invalid_field", "name"),
    bad("post_workspaces", "name-nul", {"name": "a\x00b"}, 400, "invalid_field", "name"),
    bad("post_workspaces", "name-list", {"name": ["a"]}, 400, "invalid_field", "name"),
    bad(
        "post_workspaces",
        "name-unicode-spaces",
        {"name": "\u2003\u3000"},
        400,
        "missing_field",
        "name",
    ),
    bad(
        "post_workspaces",
        "url-javascript",
        {"name": "a", "url": "javascript:x"},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_workspaces",
        "url-2049",
        {"name": "a", "url": "http://" + "h" * 2042},
        400,
        "invalid_field",
        "url",
    ),
    bad(
        "post_workspaces",
        "delivery-number",
        {"name": "a", "delivery": 1},
        400,
        "invalid_field",
        "delivery",
    ),
    bad(
        "post_workspaces",
        "delivery-case",
        {"name": "a", "delivery": "HTTP"},
        400,
        "invalid_field",
        "delivery",
    ),
    bad(
        "post_workspaces",
        "plugins-101",
        {"name": "a", "plugins": [{"source": S}] * 101},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-item-string",
        {"name": "a", "plugins": [S]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-item-null",
        {"name": "a", "plugins": [None]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-source-number",
        {"name": "a", "plugins": [{"source": 1}]},
        400,
        "invalid_field",
        "source",
    ),
    bad(
        "post_workspaces",
        "plugin-source-2049",
        {"name": "a", "plugins": [{"source": "f" * 2049}]},
        400,
        "invalid_field",
        "source",
    ),
    bad(
        "post_workspaces",
        "plugin-name-number",
        {"name": "a", "plugins": [{"source": S, "name": 7}]},
        400,
        "invalid_field",
        "name",
    ),
    bad(
        "post_workspaces",
        "plugin-name-dotdot",
        {"name": "a", "plugins": [{"source": S, "name": ".."}]},
        400,
        "invalid_plugin_name",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-name-slash",
        {"name": "a", "plugins": [{"source": S, "name": "a/b"}]},
        400,
        "invalid_plugin_name",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-name-dash",
        {"name": "a", "plugins": [{"source": S, "name": "-rf"}]},
        400,
        "invalid_plugin_name",
        "plugins",
    ),
    bad(
        "post_workspaces",
        "plugin-name-65",
        {"name": "a", "plugins": [{"source": S, "name": "p" * 65}]},
        400,
        "invalid_field",
        "name",
    ),
    # Replace the declared set.
    bad(
        "put_workspace_plugins",
        "plugins-object",
        {"plugins": {"source": S}},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "put_workspace_plugins",
        "plugins-101",
        {"plugins": [{"source": S}] * 101},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "put_workspace_plugins",
        "plugin-item-number",
        {"plugins": [1]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "put_workspace_plugins",
        "plugin-unknown-field",
        {"plugins": [{"source": S, "sha": "x"}]},
        400,
        "unknown_field",
        "sha",
    ),
    bad(
        "put_workspace_plugins",
        "plugin-empty-source",
        {"plugins": [{"source": ""}]},
        400,
        "invalid_field",
        "plugins",
    ),
    bad(
        "put_workspace_plugins",
        "duplicate-default-names",
        {"plugins": [{"source": S}] * 2},
        400,
        "invalid_field",
        "plugins",
    ),
    # Request a reconcile.
    bad("post_workspace_reconcile", "refresh-int", {"refresh": 1}, 400, "invalid_field", "refresh"),
    bad(
        "post_workspace_reconcile",
        "refresh-string-true",
        {"refresh": "true"},
        400,
        "invalid_field",
        "refresh",
    ),
    bad(
        "post_workspace_reconcile",
        "refresh-list",
        {"refresh": [True]},
        400,
        "invalid_field",
        "refresh",
    ),
    # Fan out.
    bad("post_plugins_reconcile", "source-number", {"source": 5}, 400, "invalid_field", "source"),
    bad("post_plugins_reconcile", "name-list", {"name": ["a"]}, 400, "invalid_field", "name"),
    bad("post_plugins_reconcile", "name-nul", {"name": "a\x00"}, 400, "invalid_field", "name"),
    bad(
        "post_plugins_reconcile",
        "both-null",
        {"name": None, "source": None},
        400,
        "invalid_field",
        "source",
    ),
    bad(
        "post_plugins_reconcile",
        "source-traversal",
        {"source": "git+file:///a/%2e%2e/b#main"},
        400,
        "invalid_source",
        "source",
    ),
]


# --- 3. requests the workspace's state refuses ---------------------------------------------


# --- 4. bad ids in paths --------------------------------------------------------------------

BAD_IDS = [
    pytest.param("not-a-uuid", id="word"),
    pytest.param("0" * 31 + "g", id="32-chars-not-hex"),
    pytest.param("x" * 3000, id="3000-chars"),
    pytest.param(str(uuid.uuid4()) + "0", id="uuid-plus-a-digit"),
    pytest.param("'; DROP TABLE workspaces; --", id="sql-injection"),
    pytest.param("%00", id="encoded-nul"),
    pytest.param("ÿ", id="non-ascii"),
    pytest.param(str(uuid.uuid4()), id="unknown-uuid"),
    pytest.param(f"urn:uuid:{uuid.uuid4()}", id="unknown-urn-uuid"),
]


# --- 5. bad query parameters ----------------------------------------------------------------

QUERY_CASES = [
    ("get_workspaces", "status=bogus", "status"),
    ("get_workspaces", "status=ONLINE", "status"),
    ("get_workspaces", "status=%00", "status"),
    ("get_workspaces", "limit=0", "limit"),
    ("get_workspaces", "limit=-1", "limit"),
    ("get_workspaces", "limit=501", "limit"),
    ("get_workspaces", "limit=1e3", "limit"),
    ("get_workspaces", "limit=0x10", "limit"),
    ("get_workspaces", "limit=", "limit"),
    ("get_workspaces", "limit=" + "9" * 30, "limit"),
    ("get_workspaces", "limit=" + "9" * 5000, "limit"),
    ("get_workspaces", "cursor=not-a-uuid", "cursor"),
    ("get_workspaces", "cursor=%27%20OR%201%3D1%20--", "cursor"),
    ("get_workspace_events", "after=-1", "after"),
    ("get_workspace_events", "after=x", "after"),
    ("get_workspace_events", "after=1.5", "after"),
    ("get_workspace_events", "limit=0", "limit"),
    ("get_workspace_events", "limit=501", "limit"),
    ("get_workspace_reconciles", "limit=0", "limit"),
    ("get_workspace_reconciles", "limit=101", "limit"),
    ("get_workspace_reconciles", "limit=many", "limit"),
    ("get_events", "workspace_id=not-a-uuid", "workspace_id"),
    ("get_events", "after=-1", "after"),
    ("get_events", "after=tomorrow", "after"),
    # Present but empty is not absent: `cursor=` must not restart a pager at page one, and
    # `workspace_id=` must not widen a filter to the whole fleet.
    ("get_workspaces", "cursor=", "cursor"),
    ("get_workspaces", "status=", "status"),
    ("get_events", "workspace_id=", "workspace_id"),
    ("get_events", "after=", "after"),
    ("get_workspace_events", "after=", "after"),
    ("get_workspace_reconciles", "limit=", "limit"),
    # Integers are ASCII digits only; int() alone would take every one of these.
    ("get_workspaces", "limit=1_0", "limit"),
    ("get_workspaces", "limit=%2B2", "limit"),
    ("get_workspaces", "limit=%202%20", "limit"),
    ("get_workspaces", "limit=%D9%A3", "limit"),
    ("get_workspace_events", "after=%2B1", "after"),
    ("get_workspace_reconciles", "limit=%EF%BC%93", "limit"),
    ("get_events", "after=0_1", "after"),
]


BEYOND_BIGINT = str(2**63)


# --- 6. hostile headers ---------------------------------------------------------------------


async def raw_request(world: World, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes the HTTP client would refuse to send; return the status and the body."""
    server = world.registry.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# --- 7. hostile plugin sources at declaration -----------------------------------------------

SourceBuilder = Callable[[Path, Path], str]


def src(label: str, build: SourceBuilder, status: int) -> Any:
    return pytest.param(build, status, id=label)


SOURCE_CASES = [
    src("file-dotdot-out-of-allowlist", lambda d, o: f"file://{d}/../outside/evil", 403),
    src("file-dotdot-to-etc", lambda d, o: f"file://{d}/" + "../" * 30 + "etc", 403),
    src("file-symlinked-dir-escape", lambda d, o: f"file://{d}/link-out", 403),
    src("file-symlinked-dir-to-etc", lambda d, o: f"file://{d}/link-etc", 403),
    src("file-sibling-prefix", lambda d, o: f"file://{d}-evil/x", 403),
    src("file-etc", lambda d, o: "file:///etc", 403),
    src("file-relative", lambda d, o: "file://relative/dir", 400),
    src("file-with-host", lambda d, o: f"file://localhost{d}/p", 400),
    src("file-with-ref", lambda d, o: f"file://{d}/p#main", 400),
    src("file-newline", lambda d, o: f"file://{d}/p\n", 400),
    src("leading-space", lambda d, o: f" file://{d}/p", 400),
    src("uppercase-scheme", lambda d, o: f"FILE://{d}/p", 400),
    src("javascript", lambda d, o: "javascript:alert(1)", 400),
    src("git-file-dotdot-out", lambda d, o: f"git+file://{d}/../outside/repo#main", 403),
    src("git-file-percent-dotdot", lambda d, o: f"git+file://{d}/%2e%2e/%2e%2e/etc#main", 400),
    src("git-file-symlinked-dir-escape", lambda d, o: f"git+file://{d}/link-out#main", 403),
    src("git-file-query", lambda d, o: f"git+file://{d}/repo?x=1#main", 400),
    src(
        "git-ref-upload-pack",
        lambda d, o: f"git+file://{d}/repo#--upload-pack=touch {o}/pwned",
        400,
    ),
    src("git-ref-dash-c", lambda d, o: f"git+file://{d}/repo#-cprotocol.file.allow=always", 400),
    src("git-ref-dotdot", lambda d, o: f"git+file://{d}/repo#main..other", 400),
    src("git-ref-reflog", lambda d, o: f"git+file://{d}/repo#main@{{1}}", 400),
    src("git-ref-tilde", lambda d, o: f"git+file://{d}/repo#main~1", 400),
    src("git-ref-lock", lambda d, o: f"git+file://{d}/repo#main.lock", 400),
    src("git-ref-256", lambda d, o: f"git+file://{d}/repo#" + "r" * 256, 400),
    src("git-url-option", lambda d, o: "git+-oProxyCommand=touch_pwned#main", 400),
    src("git-ssh-option-host", lambda d, o: "git+ssh://-oProxyCommand=x/repo#main", 400),
    src("git-ssh-option-user", lambda d, o: "git+ssh://-oX@host/repo#main", 400),
    src("git-scp-option-user", lambda d, o: "git+-oX@host:repo#main", 400),
    src("git-ext-transport", lambda d, o: "git+ext::sh -c touch% /tmp/pwned#main", 400),
    src("git-fd-transport", lambda d, o: "git+fd::17#main", 400),
    src("git-https-dotdot", lambda d, o: "git+https://git.example/a/../b.git#main", 400),
    src("git-https-encoded-dotdot", lambda d, o: "git+https://git.example/a/%2E%2E/b#main", 400),
    src("git-https-backslash", lambda d, o: "git+https://git.example\\@evil/x#main", 400),
    src("git-https-not-allowlisted", lambda d, o: "git+https://evil.example/x.git#main", 403),
    src(
        "git-https-userinfo-host-confusion",
        lambda d, o: f"git+https://file:{d}@evil.example/x.git#main",
        400,
    ),
    src("git-ftp-scheme", lambda d, o: "git+ftp://evil.example/x.git#main", 400),
    src("github-not-allowlisted", lambda d, o: "github://evil/x#main", 403),
    src("github-dash-owner", lambda d, o: "github://-evil/x#main", 400),
    src("github-subdir-dotdot", lambda d, o: "github://acme/x/../../y#main", 400),
    src("github-dot-repo", lambda d, o: "github://acme/.git#main", 400),
    src("gitea-not-allowlisted", lambda d, o: "gitea://evil.example/o/r#main", 403),
    src("gitea-ipv6-host", lambda d, o: "gitea://[::1]/o/r#main", 400),
    src("svn-scheme", lambda d, o: "svn://evil.example/x", 400),
]


@pytest.fixture(scope="class")
def hostile_tree(shared: Registry) -> Path:
    """An allowlisted directory with symlinks that point out of it, and a place outside."""
    plugin_sources = sources_of(shared)
    outside = plugin_sources.parent / "outside"
    write_tree(outside / "evil", {"secret.txt": "s3cret"})
    make_git_repo(outside / "repo", {"evil.py": "x"})
    os.symlink(outside, plugin_sources / "link-out")
    os.symlink("/etc", plugin_sources / "link-etc")
    make_git_repo(plugin_sources / "repo", {"ok.py": "ok"})
    return outside


# --- 8. hostile plugin trees, met at reconcile time -----------------------------------------


async def declare_and_reconcile(
    registry: Registry, source: str
) -> tuple[list[Any], dict[str, Any]]:
    response = await registry.client.post(
        "/workspaces",
        json={"name": "a", "plugins": [{"source": source, "name": "p"}]},
        headers=ADMIN,
    )
    assert response.status == 201, await response.text()
    data = await response.json()
    workspace = Workspace(data["workspace"]["id"], data["token"])
    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)
    return runs, await registry.show(workspace)


def assert_failed_and_nothing_installed(
    registry: Registry, runs: list[Any], shown: dict[str, Any], code: str | tuple[str, ...]
) -> None:
    codes = code if isinstance(code, tuple) else (code,)
    assert [r["status"] for r in runs] == ["failed"], runs
    assert any(c in runs[0]["error"] for c in codes), runs[0]["error"]
    assert shown["installed_plugins"] == []
    workspace_dir = registry.settings.resolved_plugins_dir / shown["id"]
    assert not workspace_dir.exists() or not any(workspace_dir.rglob("*"))


@pytest.mark.asyncio(loop_scope="class")
class TestBadRequests:
    """Requests refused by one app shared by the class; each compares the state before and after."""

    @pytest.mark.parametrize(
        ("name", "kind", "payload"),
        [
            pytest.param(name, kind, payload, id=f"{kind}-{name}")
            for name in BODY_ROUTES
            for kind, payload in MALFORMED
            # The reconcile request body is optional: an empty one means {}.
            if not (name == "post_workspace_reconcile" and kind == "empty")
        ],
    )
    async def test_body_that_is_not_a_json_object_is_400_invalid_body_and_changes_nothing(
        self, world: World, name: str, kind: str, payload: bytes
    ) -> None:
        before = await state(world.registry.db)

        response = await send(
            world,
            name,
            data=payload,
            headers={
                **auth_for(world, route_named(world, name)),
                "Content-Type": "application/json",
            },
        )

        await assert_error(response, 400, "invalid_body")
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize("name", BODY_ROUTES)
    @pytest.mark.parametrize("transfer", ["content-length", "chunked"])
    async def test_oversize_body_is_413_and_changes_nothing(
        self, world: World, name: str, transfer: str
    ) -> None:
        cap = world.registry.settings.max_body_bytes
        before = await state(world.registry.db)
        if transfer == "chunked":
            data: Any = _chunks(cap + 1)
        else:
            data = b'{"name": "' + b"x" * (cap + 1) + b'"}'

        response = await send(world, name, data=data)

        await assert_error(response, 413, "body_too_large")
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize(("name", "body", "status", "code", "field"), FIELD_CASES)
    async def test_bad_field_is_refused_with_its_field_named_and_changes_nothing(
        self,
        world: World,
        name: str,
        body: dict[str, Any],
        status: int,
        code: str,
        field: str | None,
    ) -> None:
        before = await state(world.registry.db)

        response = await send(world, name, body=fill(body, world))

        await assert_error(response, status, code, field)
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize(
        ("name", "status_before", "status", "code"),
        [
            pytest.param(
                "post_workspace_reconcile",
                "provisioning",
                409,
                "workspace_not_live",
                id="reconcile-provisioning",
            ),
            pytest.param(
                "post_workspace_reconcile",
                "paused",
                409,
                "workspace_not_live",
                id="reconcile-paused",
            ),
            pytest.param(
                "post_workspace_reconcile",
                "removed",
                409,
                "workspace_removed",
                id="reconcile-removed",
            ),
            pytest.param("post_resume", "online", 409, "not_paused", id="resume-not-paused"),
            pytest.param("post_pause", "removed", 409, "workspace_removed", id="pause-removed"),
            pytest.param("post_resume", "removed", 409, "workspace_removed", id="resume-removed"),
            pytest.param("post_token", "removed", 409, "workspace_removed", id="token-removed"),
            pytest.param(
                "put_workspace_plugins", "removed", 409, "workspace_removed", id="plugins-removed"
            ),
            pytest.param(
                "post_heartbeat", "removed", 410, "workspace_removed", id="heartbeat-removed"
            ),
            pytest.param(
                "post_register", "removed", 410, "workspace_removed", id="register-removed"
            ),
        ],
    )
    async def test_request_the_workspace_state_refuses_changes_nothing(
        self, world: World, name: str, status_before: str, status: int, code: str
    ) -> None:
        target = await world.registry.create_workspace()
        await world.registry.set_status(target, status_before)
        route = route_named(world, name)
        body = world.valid_body(route)
        if body is not None and "workspace_id" in body:
            body["workspace_id"] = target.id
        headers = target.auth if name in ("post_heartbeat", "post_register") else ADMIN
        before = await state(world.registry.db)

        response = await world.registry.client.request(
            route.method, world.fill(route, target.id), json=body, headers=headers
        )

        await assert_error(response, status, code)
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize("name", ID_ROUTES)
    @pytest.mark.parametrize("bad_id", BAD_IDS)
    async def test_bad_path_id_is_404_and_changes_nothing(
        self, world: World, name: str, bad_id: str
    ) -> None:
        route = route_named(world, name)
        before = await state(world.registry.db)

        response = await world.registry.client.request(
            route.method,
            route.path.replace("{id}", bad_id),
            json=world.valid_body(route),
            headers=ADMIN,
        )

        resource = "reconcile" if name == "get_reconcile" else "workspace"
        await assert_error(response, 404, f"{resource}_not_found")
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize(
        ("name", "query", "field"),
        [pytest.param(n, q, f, id=f"{n}-{q[:24]}") for n, q, f in QUERY_CASES],
    )
    async def test_bad_query_parameter_is_400_naming_it(
        self, world: World, name: str, query: str, field: str
    ) -> None:
        route = route_named(world, name)
        before = await state(world.registry.db)

        response = await world.registry.client.get(f"{world.fill(route)}?{query}", headers=ADMIN)

        await assert_error(response, 400, "invalid_field", field)
        assert diff(before, await state(world.registry.db)) == {}

    @pytest.mark.parametrize("name", ["get_workspace_events", "get_events"])
    async def test_bad_last_event_id_header_is_400(self, world: World, name: str) -> None:
        route = route_named(world, name)

        response = await world.registry.client.get(
            world.fill(route), headers={**ADMIN, "Last-Event-ID": "-5"}
        )

        await assert_error(response, 400, "invalid_field", "Last-Event-ID")

    @pytest.mark.parametrize("name", ["get_workspace_events", "get_events"])
    async def test_empty_last_event_id_header_is_400(self, world: World, name: str) -> None:
        route = route_named(world, name)

        response = await world.registry.client.get(
            world.fill(route), headers={**ADMIN, "Last-Event-ID": ""}
        )

        await assert_error(response, 400, "invalid_field", "Last-Event-ID")

    @pytest.mark.parametrize("name", ["get_workspace_events", "get_events"])
    async def test_bad_after_is_400_even_beside_a_valid_last_event_id(
        self, world: World, name: str
    ) -> None:
        route = route_named(world, name)

        response = await world.registry.client.get(
            f"{world.fill(route)}?after=yesterday", headers={**ADMIN, "Last-Event-ID": "1"}
        )

        await assert_error(response, 400, "invalid_field", "after")

    @pytest.mark.parametrize("where", ["query", "header"])
    async def test_event_cursor_beyond_bigint_is_400(self, world: World, where: str) -> None:
        path = f"/workspaces/{world.online.id}/events"
        headers = dict(ADMIN)
        if where == "query":
            path += f"?after={BEYOND_BIGINT}"
        else:
            headers["Last-Event-ID"] = BEYOND_BIGINT

        response = await world.registry.client.get(path, headers=headers)

        await assert_error(
            response, 400, "invalid_field", "after" if where == "query" else "Last-Event-ID"
        )

    async def test_event_stream_cursor_beyond_bigint_is_400(self, world: World) -> None:
        response = await world.registry.client.get(f"/events?after={BEYOND_BIGINT}", headers=ADMIN)
        try:
            await assert_error(response, 400, "invalid_field", "after")
        finally:
            response.close()

    @pytest.mark.parametrize("name", ["post_heartbeat", "get_workspaces", "post_workspaces"])
    async def test_non_utf8_authorization_header_is_401(self, world: World, name: str) -> None:
        route = route_named(world, name)
        body = b""
        if route.name == "post_heartbeat":
            body = b'{"workspace_id": "%s"}' % world.online.id.encode()
        elif route.name == "post_workspaces":
            body = b'{"name": "x"}'
        before = await state(world.registry.db)

        status, _ = await raw_request(
            world,
            b"%s %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\xfd\r\n"
            % (route.method.encode(), route.path.encode()),
            body,
        )

        assert diff(before, await state(world.registry.db)) == {}
        assert status == 401

    @pytest.mark.parametrize(
        "authorization",
        [
            pytest.param("Bearer " + "a" * 600, id="600-char-token"),
            pytest.param("Bearer", id="scheme-only"),
            pytest.param("Bearer\t" + "x", id="tab-separator"),
            pytest.param("Basic YWRtaW46YWRtaW4=", id="basic-auth"),
        ],
    )
    @pytest.mark.parametrize("name", ["post_heartbeat", "post_workspaces"])
    async def test_hostile_authorization_header_is_401_and_changes_nothing(
        self, world: World, name: str, authorization: str
    ) -> None:
        route = route_named(world, name)
        before = await state(world.registry.db)

        response = await world.registry.client.request(
            route.method,
            world.fill(route),
            json=world.valid_body(route),
            headers={"Authorization": authorization},
        )

        await assert_error(response, 401, "unauthorized")
        assert diff(before, await state(world.registry.db)) == {}

    async def test_agent_card_nested_too_deep_is_400(self, world: World) -> None:
        card: dict[str, Any] = {}
        inner = card
        for _ in range(300):
            inner["a"] = {}
            inner = inner["a"]
        before = await state(world.registry.db)

        response = await send(
            world, "post_register", body={"workspace_id": world.online.id, "agent_card": card}
        )

        assert diff(before, await state(world.registry.db)) == {}
        await assert_error(response, 400, "invalid_field", "agent_card")

    @pytest.mark.parametrize(("build", "status"), SOURCE_CASES)
    async def test_hostile_plugin_source_is_refused_everywhere_and_changes_nothing(
        self, world: World, hostile_tree: Path, build: SourceBuilder, status: int
    ) -> None:
        source = build(sources_of(world.registry), hostile_tree)
        code = "source_denied" if status == 403 else "invalid_source"
        client = world.registry.client
        before = await state(world.registry.db)

        created = await client.post(
            "/workspaces", json={"name": "a", "plugins": [{"source": source}]}, headers=ADMIN
        )
        replaced = await client.put(
            f"/workspaces/{world.online.id}/plugins",
            json={"plugins": [{"source": source, "name": "p"}]},
            headers=ADMIN,
        )
        fanned = await client.post(
            "/internal/plugins/reconcile", json={"source": source}, headers=ADMIN
        )

        await assert_error(created, status, code, "plugins")
        await assert_error(replaced, status, code, "plugins")
        if status == 400:
            await assert_error(fanned, 400, "invalid_source", "source")
        else:
            # The fan-out only matches declared sources; a denied one matches nothing.
            assert fanned.status == 202, await fanned.text()
            assert await fanned.json() == {"queued": 0}
        assert diff(before, await state(world.registry.db)) == {}
        assert not (hostile_tree / "pwned").exists()


async def test_plugin_dir_with_a_symlink_to_etc_fails_symlink_refused_and_installs_nothing(
    registry: Registry, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "sly", {"main.py": "x"})
    os.symlink("/etc", plugin / "etc")

    runs, shown = await declare_and_reconcile(registry, f"file://{plugin}")

    assert_failed_and_nothing_installed(registry, runs, shown, "symlink_refused")


async def test_git_repo_with_a_symlink_to_etc_fails_symlink_refused_and_installs_nothing(
    registry: Registry, plugin_sources: Path
) -> None:
    repo = plugin_sources / "sly-repo"
    make_git_repo(repo, {"main.py": "x"})
    os.symlink("/etc/passwd", repo / "passwd")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "symlink")

    runs, shown = await declare_and_reconcile(registry, f"git+file://{repo}#main")

    assert_failed_and_nothing_installed(registry, runs, shown, "symlink_refused")


async def test_plugin_dir_swapped_for_a_symlink_after_declaration_installs_nothing(
    registry: Registry, plugin_sources: Path, tmp_path: Path
) -> None:
    """Declared while it was a real directory; by reconcile time it points outside."""
    outside = write_tree(tmp_path / "outside", {"secret.txt": "s3cret"})
    plugin = write_tree(plugin_sources / "p", {"main.py": "x"})
    workspace = await registry.create_workspace([{"source": f"file://{plugin}"}])
    shutil.rmtree(plugin)
    os.symlink(outside, plugin)

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert_failed_and_nothing_installed(
        registry, runs, await registry.show(workspace), ("symlink_refused", "source_denied")
    )
    assert not list(registry.settings.resolved_plugins_dir.rglob("secret.txt"))


@pytest.mark.parametrize(
    ("limit", "kind"),
    [
        pytest.param({"fetch_max_bytes": 10_000}, "git-big-blob", id="git-bytes"),
        pytest.param({"fetch_max_files": 5}, "git-many-files", id="git-files"),
        pytest.param({"fetch_max_files": 5}, "file-many-files", id="file-files"),
        pytest.param({"fetch_max_bytes": 10_000}, "file-many-small", id="file-bytes-summed"),
    ],
)
async def test_oversize_tree_fails_tree_too_large_and_installs_nothing(
    make_registry: MakeRegistry, plugin_sources: Path, limit: dict[str, int], kind: str
) -> None:
    registry = await make_registry(**limit)
    many = {f"f{i}.txt": "x" for i in range(20)}
    if kind == "git-big-blob":
        make_git_repo(plugin_sources / "big", {"blob.bin": "x" * 20_000})
        source = f"git+file://{plugin_sources}/big#main"
    elif kind == "git-many-files":
        make_git_repo(plugin_sources / "many", many)
        source = f"git+file://{plugin_sources}/many#main"
    elif kind == "file-many-files":
        source = f"file://{write_tree(plugin_sources / 'many', many)}"
    else:
        files = {f"d{i}/f.txt": "x" * 1_000 for i in range(15)}
        source = f"file://{write_tree(plugin_sources / 'small', files)}"

    runs, shown = await declare_and_reconcile(registry, source)

    assert_failed_and_nothing_installed(registry, runs, shown, "tree_too_large")


async def test_percent_encoded_dot_dot_in_a_file_source_is_a_literal_name(
    registry: Registry, plugin_sources: Path, tmp_path: Path
) -> None:
    """file:// paths are not URL-decoded: %2e%2e is a directory named so, inside the allowed
    directory, never a way out of it; nothing outside is ever installed."""
    write_tree(tmp_path / "outside" / "evil", {"secret.txt": "s3cret"})
    source = f"file://{plugin_sources}/%2e%2e/outside/evil"
    workspace = await registry.create_workspace()

    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": source, "name": "p"}]},
        headers=ADMIN,
    )
    assert response.status == 200, await response.text()
    declared = (await response.json())["declared_plugins"]
    assert [d["source"] for d in declared] == [source]
    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert [r["status"] for r in runs] == ["failed"]
    assert (await registry.show(workspace))["installed_plugins"] == []
    assert not list(registry.settings.resolved_plugins_dir.rglob("secret.txt"))
