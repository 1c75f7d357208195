"""Helpers for the hostile-input, fuzz and auth-matrix suites: state snapshots, the error
envelope check, the route table with concrete ids, and a database that refuses every checkout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

import registry as registry_package
from registry.app import create_app
from registry.settings import Settings
from tests.support import ADMIN, ADMIN_TOKEN, Registry, Workspace

SPEC: dict[str, Any] = json.loads(
    (Path(registry_package.__file__).parent / "openapi.json").read_text()
)

# Every table a request can write to. fleet_guard is left out: the liveness sweeper
# refreshes it on its own schedule, whatever the requests do.
STATE_TABLES = (
    "workspaces",
    "removed_workspaces",
    "declared_plugins",
    "installed_plugins",
    "reconciles",
    "reconcile_steps",
    "workspace_actions",
    "api_tokens",
)


# Due within a minute: a run scheduled further ahead (make_world's, an hour; a
# `runtime_restarted` run, up to REGISTRY_RESTART_RECONCILE_EVERY_S = 5 min after the last
# run) is not work in progress. With a 5-minute horizon the latter counted, and was waited for.
PENDING_RUNS = (
    "SELECT count(*) FROM reconciles WHERE status IN ('queued', 'running') "
    "AND (next_attempt_at IS NULL OR next_attempt_at < now() + interval '1 minute')"
)


async def quiesce(db: asyncpg.Connection, within_s: float = 20.0) -> None:
    """Wait until the reconcile worker has nothing due: no background write can then land
    between two snapshots. (A run parked an hour ahead, as make_world's, does not count.)"""
    deadline = asyncio.get_running_loop().time() + within_s
    while await db.fetchval(PENDING_RUNS):
        assert asyncio.get_running_loop().time() < deadline, "reconciles did not settle"
        await asyncio.sleep(0.02)


DAY_S = 86400.0

# Recording a refused runtime request on its workspace is the one thing a refusal writes,
# by design (README, "Runtimes of every version"), and the flusher writes it when it wakes.
# The stored plugins_sync is a cache of what the other columns say, refreshed in the
# background (registry/sync_state.py): not a change of state either.
BACKGROUND_COLUMNS = frozenset(
    {
        "plugins_sync",
        "refused_at",
        "refused_since",
        "refused_count",
        "refused_status",
        "refused_code",
        "refused_field",
    }
)


async def state(db: asyncpg.Connection) -> dict[str, Any]:
    """Every row of every state table (order-independent) and the number of events, once
    the background reconciles have settled."""
    await quiesce(db)
    snapshot: dict[str, Any] = {}
    for table in STATE_TABLES:
        rows = await db.fetch(f"SELECT * FROM {table}")
        snapshot[table] = sorted(
            repr(sorted((k, v) for k, v in dict(row).items() if k not in BACKGROUND_COLUMNS))
            for row in rows
        )
    snapshot["workspace_events"] = await db.fetchval("SELECT count(*) FROM workspace_events")
    return snapshot


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


async def assert_error(
    response: ClientResponse,
    status: int | tuple[int, ...],
    code: str | tuple[str, ...] | None = None,
    field: str | None = None,
) -> dict[str, Any]:
    """The response is API.md's error envelope with this status (and code and field)."""
    statuses = status if isinstance(status, tuple) else (status,)
    text = await response.text()
    assert response.status in statuses, f"{response.status}: {text}"
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) <= {"code", "message", "field"}, error
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        codes = code if isinstance(code, tuple) else (code,)
        assert error["code"] in codes, error
    if field is not None:
        assert error.get("field") == field, error
    return error


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # canonical, with {id}
    name: str

    @property
    def has_body(self) -> bool:
        return self.method in ("POST", "PUT")


def router_routes(registry: Registry) -> list[Route]:
    """The routes of the running app, as the router has them (HEAD twins left out)."""
    return sorted(
        (
            Route(route.method, route.resource.canonical, route.name or "")
            for route in registry.client.app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        ),
        key=lambda r: (r.path, r.method),
    )


def operation(route_name: str) -> tuple[str, str, dict[str, Any]]:
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and op.get("operationId") == route_name:
                return method.upper(), path, op
    raise KeyError(route_name)


def documented_statuses(route_name: str) -> set[int]:
    return {int(s) for s in operation(route_name)[2]["responses"]}


@dataclass
class World:
    """Two workspaces (one online), a queued reconcile and an allowlisted plugin directory."""

    registry: Registry
    online: Workspace
    other: Workspace
    reconcile_id: str
    allowed_source: str

    def fill(self, route: Route, workspace_id: str | None = None) -> str:
        if route.name == "get_reconcile":
            return route.path.replace("{id}", self.reconcile_id)
        return route.path.replace("{id}", workspace_id or self.online.id)

    def valid_body(self, route: Route) -> dict[str, Any] | None:
        """A body the route accepts from the right caller: only auth can refuse it."""
        bodies: dict[str, dict[str, Any] | None] = {
            "post_heartbeat": {"workspace_id": self.online.id, "error_rate": 0.0},
            "post_register": {"workspace_id": self.online.id, "url": "http://127.0.0.1:9"},
            "post_workspaces": {"name": "intruder", "plugins": []},
            "put_workspace_plugins": {"plugins": [{"source": self.allowed_source}]},
            "post_workspace_reconcile": {"refresh": True},
            "post_plugins_reconcile": {"name": "p"},
            "post_tokens": {"name": "intruder", "role": "read"},
        }
        return bodies.get(route.name)


async def make_world(registry: Registry, plugin_sources: Path) -> World:
    plugin = plugin_sources / "p"
    plugin.mkdir(exist_ok=True)
    (plugin / "p.py").write_text("print('p')\n")
    online = await registry.create_workspace()
    other = await registry.create_workspace()
    await registry.set_status(online, "online")
    # A reconcile the worker will not claim for an hour: it stays queued and unchanged.
    reconcile_id = await registry.db.fetchval(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'manual', now() + interval '1 hour') RETURNING id",
        uuid.UUID(online.id),
    )
    return World(registry, online, other, str(reconcile_id), f"file://{plugin}")


@contextlib.contextmanager
def database_down(
    monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None
) -> Iterator[None]:
    """Every pool checkout fails as it does when PostgreSQL cannot be reached."""
    failure = error or ConnectionRefusedError("database down (test)")

    async def refuse(self: asyncpg.pool.PoolAcquireContext[Any]) -> Any:
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.pool.PoolAcquireContext, "__aenter__", refuse)
        yield


TRUNCATE = (
    "TRUNCATE workspace_actions, reconcile_steps, reconciles, workspace_events, "
    "installed_plugins, declared_plugins, workspaces, removed_workspaces, api_tokens "
    "RESTART IDENTITY CASCADE"
)


@contextlib.asynccontextmanager
async def shared_registry(dsn: str, base: Path) -> AsyncIterator[Registry]:
    """The app on an emptied database, for a whole class of tests that each leave the state
    as they found it (they compare snapshots). A class, not a module: the app's loop only
    runs during the class's tests, so function-scoped tests (whose `db` fixture truncates
    the tables) must come after its teardown, never while its connections may hold locks.
    Settings as tests/conftest.py's, with the allowlisted source directory at `<base>/sources`."""
    sources = base / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        admin_token=ADMIN_TOKEN,
        data_dir=base / "data",
        plugins_dir=base / "plugins",
        plugin_allowlist=(f"file://{sources}/", f"git+file://{sources}/"),
        reconcile_poll_s=0.2,
        reconcile_lease_s=3.0,
        reconcile_retry_base_s=0.05,
        reconcile_retry_cap_s=0.5,
        reconcile_timeout_s=30.0,
        fetch_timeout_s=20.0,
        # No workspace of the class goes silent long enough to be swept: a class of hundreds
        # of tests outlasts the default windows on a loaded machine, and an expiry between
        # two snapshots would read as a change the request made.
        offline_after_s=DAY_S,
        offline_after_max_s=DAY_S,
        provision_timeout_s=DAY_S,
    )
    db = await asyncpg.connect(dsn)
    await db.execute(TRUNCATE)
    client = TestClient(TestServer(create_app(settings, dsn)))
    await client.start_server()
    try:
        yield Registry(client, db, settings)
    finally:
        await client.close()
        await db.close()
        # Let cancellations the shutdown started (asyncpg cancels queries of cancelled
        # handlers in tasks of its own) finish before the class's loop closes.
        await asyncio.sleep(0.1)


__all__ = [
    "ADMIN",
    "SPEC",
    "Route",
    "World",
    "assert_error",
    "database_down",
    "diff",
    "documented_statuses",
    "make_world",
    "operation",
    "router_routes",
    "shared_registry",
    "state",
]
