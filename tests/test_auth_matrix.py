"""Who may call what: every route of the router against every kind of credential (every
role of API token included), token rotation, tokens kept out of the database and the logs,
constant-time token checks, and auth that fails closed when the database is unreachable."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from registry import auth
from registry.app import create_app
from registry.auth import PUBLIC_ROUTES, UI_ROUTES, WORKSPACE_TOKEN_ROUTES, Role, required_role
from registry.db import api_tokens as db_api_tokens
from registry.keys import REFUSALS
from registry.settings import Settings
from tests.hostile_support import (
    World,
    assert_error,
    database_down,
    diff,
    make_world,
    router_routes,
    shared_registry,
    state,
)
from tests.support import ADMIN, ADMIN_TOKEN, Registry, Workspace, bearer, write_tree


def _collected_routes() -> list[tuple[str, str, str]]:
    """The router's table, read from an app that is built but never started (no I/O)."""
    app = create_app(Settings(admin_token="collect-only"), "postgresql://collect-only/x")
    return sorted(
        (route.name or "", route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    )


ROUTES = _collected_routes()
CREDENTIALS = (
    "none",
    "malformed-scheme",
    "malformed-empty",
    "admin-token-without-scheme",
    "wrong-token",
    "own-workspace-token",
    "other-workspace-token",
    "admin-token",
    "read-token",
    "operate-token",
    "admin-api-token",
    "revoked-token",
    "expired-token",
    "near-miss-api-token",
)
# The API tokens of the matrix, by credential: (role, or the 401 code they get).
API_CREDENTIALS: dict[str, Role | str] = {
    "read-token": Role.READ,
    "operate-token": Role.OPERATE,
    "admin-api-token": Role.ADMIN,
    "revoked-token": "token_revoked",
    "expired-token": "token_expired",
    "near-miss-api-token": "unauthorized",
}
# GET routes that are more than reading: they show who may act.
ADMIN_READS = frozenset({"get_tokens"})


def kind(name: str) -> str:
    if name in PUBLIC_ROUTES:
        return "public"
    if name in WORKSPACE_TOKEN_ROUTES:
        return "workspace"
    if name in UI_ROUTES:
        return "ui"
    return "admin"


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def shared(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    async with shared_registry(dsn, tmp_path_factory.mktemp("auth")) as registry:
        yield registry


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def world(shared: Registry) -> World:
    return await make_world(shared, shared.settings.data_dir.parent / "sources")


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def api_tokens(shared: Registry) -> dict[str, str]:
    """A token per API credential, made through the API; the revoked and expired ones
    revoked through the API and expired by the database clock."""
    secrets = {}
    for credential, role in API_CREDENTIALS.items():
        body = {"name": f"matrix-{credential}", "role": "admin"}
        if isinstance(role, Role):
            body["role"] = role.value
        response = await shared.client.post("/tokens", json=body, headers=ADMIN)
        assert response.status == 201, await response.text()
        secrets[credential] = (await response.json())["secret"]
    revoked = await shared.client.delete("/tokens/matrix-revoked-token", headers=ADMIN)
    assert revoked.status == 204
    await shared.db.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' "
        "WHERE name = 'matrix-expired-token'"
    )
    # Same lookup handle as a live admin token, another secret: found, then refused.
    near = secrets["near-miss-api-token"]
    secrets["near-miss-api-token"] = secrets["admin-api-token"][:21] + near[21:]
    return secrets


def credential_headers(
    credential: str, own: Workspace, other: Workspace, api: dict[str, str]
) -> dict[str, str]:
    if credential in api:
        return bearer(api[credential])
    return {
        "none": {},
        "malformed-scheme": {"Authorization": f"Token {own.token}"},
        "malformed-empty": {"Authorization": "Bearer    "},
        "admin-token-without-scheme": {"Authorization": ADMIN_TOKEN},
        "wrong-token": bearer("rwt_" + "A" * 43),
        "own-workspace-token": own.auth,
        "other-workspace-token": other.auth,
        "admin-token": ADMIN,
    }[credential]


def expected(route_kind: str, credential: str, name: str) -> tuple[int | None, str | None]:
    """(status, code) the matrix demands; status None: 'authorized' (anything but
    401/403/5xx)."""
    if route_kind == "public":
        return 200, None
    if route_kind == "ui":
        # The dashboard's own routes take no token; a POST without this origin's Origin header
        # (as the matrix sends) is refused before anything else, whatever else it carries.
        return (403, "cross_origin") if name.startswith("post_") else (None, None)
    if route_kind == "workspace":
        status = {"own-workspace-token": 200, "other-workspace-token": 403}.get(credential, 401)
        return status, {200: None, 403: "forbidden", 401: "unauthorized"}[status]
    if credential == "admin-token":
        return None, None
    role = API_CREDENTIALS.get(credential)
    if isinstance(role, Role):
        return (None, None) if role.allows(required_role(name)) else (403, "role_required")
    return 401, role or "unauthorized"


# --- token rotation -------------------------------------------------------------------------


# --- the admin-token comparison -------------------------------------------------------------


def _flip(char: str) -> str:
    return "a" if char != "a" else "b"


NEAR_MISSES = (
    _flip(ADMIN_TOKEN[0]) + ADMIN_TOKEN[1:],
    ADMIN_TOKEN[:-1] + _flip(ADMIN_TOKEN[-1]),
    ADMIN_TOKEN[:-1],
    ADMIN_TOKEN + "0",
    "",
    "x" * 512,
)


def record_comparisons(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Every call of hmac.compare_digest from now on, answered by the real one."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


def test_the_admin_check_is_one_constant_time_comparison_of_fixed_length_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What must not leak is how long the admin token is and where a guess first differs: so
    # each answer, yes or no, comes from exactly one compare_digest over two SHA-256 digests
    # (no early return on a length or a raw `==`), and never over the tokens themselves.
    calls = record_comparisons(monkeypatch)
    tokens = (ADMIN_TOKEN, *NEAR_MISSES)

    answers = [auth.is_admin_token(token, ADMIN_TOKEN) for token in tokens]

    assert answers == [True] + [False] * len(NEAR_MISSES)
    assert len(calls) == len(tokens), calls
    for (a, b), token in zip(calls, tokens, strict=True):
        assert sorted((a, b)) == sorted((sha256(token), sha256(ADMIN_TOKEN)))


async def test_every_admin_request_is_decided_by_that_comparison(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_comparisons(monkeypatch)
    tokens = (ADMIN_TOKEN, *(token for token in NEAR_MISSES if token))

    statuses = []
    for token in tokens:
        response = await registry.client.get("/workspaces", headers=bearer(token))
        statuses.append(response.status)

    assert statuses == [200] + [401] * (len(tokens) - 1)
    assert [sorted(call) for call in calls] == [
        sorted((sha256(token), sha256(ADMIN_TOKEN))) for token in tokens
    ]


async def test_an_api_token_is_found_by_its_handle_and_decided_by_one_comparison(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await registry.client.post(
        "/tokens", json={"name": "ops", "role": "read"}, headers=ADMIN
    )
    secret = (await created.json())["secret"]
    tampered = secret[:-1] + _flip(secret[-1])
    stored = await registry.db.fetchval("SELECT token_hash FROM api_tokens WHERE name = 'ops'")
    calls = record_comparisons(monkeypatch)

    statuses = []
    for token in (secret, tampered):
        response = await registry.client.get("/workspaces", headers=bearer(token))
        statuses.append(response.status)

    assert statuses == [200, 401]
    # Per request: the bootstrap admin check, then the stored hash against the presented
    # token's, both fixed-length digests; never the tokens themselves.
    assert [sorted(call) for call in calls] == [
        sorted((sha256(secret), sha256(ADMIN_TOKEN))),
        sorted((bytes(stored), sha256(secret))),
        sorted((sha256(tampered), sha256(ADMIN_TOKEN))),
        sorted((bytes(stored), sha256(tampered))),
    ]


async def test_an_api_token_is_found_through_the_index_of_its_handle(
    db: asyncpg.Connection,
) -> None:
    await db.execute(
        "INSERT INTO api_tokens (name, role, lookup, token_hash, created_by) "
        "SELECT 't' || i, 'read', md5(i::text), sha256(i::text::bytea), 'admin' "
        "FROM generate_series(1, 20000) i"
    )
    await db.execute("ANALYZE api_tokens")

    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON) " + db_api_tokens.SELECT_BY_LOOKUP.replace("$1", "'0123'")
    )

    node = json.loads(plan)[0]["Plan"]
    assert node["Node Type"] == "Index Scan", node
    assert node["Index Name"] == "api_tokens_lookup_key"


@pytest.mark.parametrize(
    ("name", "method", "path"), [pytest.param(*r, id=f"{r[1]}-{r[0]}") for r in ROUTES]
)
def test_every_mutation_needs_more_than_read_and_every_read_is_read(
    name: str, method: str, path: str
) -> None:
    # From the router, so a new route is classified here or fails: a read token may
    # never change anything, and reading needs no more than `read` (tokens aside).
    if name in PUBLIC_ROUTES or name in WORKSPACE_TOKEN_ROUTES or name in UI_ROUTES:
        return
    if method == "GET":
        want = Role.ADMIN if name in ADMIN_READS else Role.READ
        assert required_role(name) is want
    else:
        assert required_role(name) is not Role.READ


def test_a_route_nobody_classified_needs_admin() -> None:
    assert required_role("post_something_new") is Role.ADMIN


def sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# --- fail closed ----------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="class")
class TestMatrix:
    """Every route against every credential, on one app shared by the class."""

    async def test_the_live_router_is_the_collected_table_and_every_route_is_classified(
        self,
        world: World,
    ) -> None:
        live = sorted((r.name, r.method, r.path) for r in router_routes(world.registry))

        assert live == ROUTES
        names = {name for name, _, _ in ROUTES}
        assert names >= PUBLIC_ROUTES
        assert names >= WORKSPACE_TOKEN_ROUTES
        assert not PUBLIC_ROUTES & WORKSPACE_TOKEN_ROUTES
        assert all(name for name in names), "an unnamed route would skip the admin gate"
        assert {
            "get_healthz",
            "get_readyz",
            "get_buildinfo",
            "get_openapi",
            "get_metrics",
        } == PUBLIC_ROUTES

    @pytest.mark.parametrize("credential", CREDENTIALS)
    @pytest.mark.parametrize(
        ("name", "method", "path"), [pytest.param(*r, id=f"{r[1]}-{r[0]}") for r in ROUTES]
    )
    async def test_auth_matrix(
        self,
        world: World,
        api_tokens: dict[str, str],
        name: str,
        method: str,
        path: str,
        credential: str,
    ) -> None:
        registry = world.registry
        # A target of the test's own (online), so that an authorized call may change it freely.
        own = await registry.create_workspace()
        await registry.set_status(own, "online")
        other = await registry.create_workspace()
        route = next(r for r in router_routes(registry) if r.name == name)
        body = world.valid_body(route)
        if body is not None and "workspace_id" in body:
            body["workspace_id"] = own.id
        headers = credential_headers(credential, own, other, api_tokens)
        want, code = expected(kind(name), credential, name)
        before = await state(registry.db)

        response = await registry.client.request(
            method, world.fill(route, own.id), json=body, headers=headers
        )
        try:
            if want is None:
                assert response.status not in (401, 403), await response.text()
                assert response.status < 500, await response.text()
            elif want == 200:
                assert response.status == 200, await response.text()
            else:
                error = await assert_error(response, want, code)
                if code == "role_required":
                    needed = required_role(name).value
                    assert f"needs the {needed} role" in error["message"]
                assert diff(before, await state(registry.db)) == {}
        finally:
            response.close()  # GET /events answers an endless stream
            if name == "get_events":
                await asyncio.sleep(0.05)  # let the server finish the cancelled handler

    @pytest.mark.parametrize("path", ["/registry/heartbeat", "/registry/register"])
    async def test_rotation_without_grace_invalidates_the_old_token_at_once(
        self, world: World, path: str
    ) -> None:
        registry = world.registry
        workspace = await registry.create_workspace()
        await registry.heartbeat(workspace)

        rotated = await registry.client.post(
            f"/workspaces/{workspace.id}/token", json={"grace_s": 0}, headers=ADMIN
        )
        assert rotated.status == 200, await rotated.text()
        new = Workspace(workspace.id, (await rotated.json())["token"])
        assert new.token != workspace.token
        before = await state(registry.db)
        old_answer = await registry.client.post(
            path, json={"workspace_id": workspace.id}, headers=workspace.auth
        )

        await assert_error(old_answer, 401, "token_rotated")
        assert diff(before, await state(registry.db)) == {}
        new_answer = await registry.client.post(
            path, json={"workspace_id": workspace.id}, headers=new.auth
        )
        assert new_answer.status == 200, await new_answer.text()

    async def test_a_second_rotation_invalidates_the_first_rotated_token(
        self, world: World
    ) -> None:
        registry = world.registry
        workspace = await registry.create_workspace()
        tokens = [workspace.token]
        for _ in range(2):
            response = await registry.client.post(
                f"/workspaces/{workspace.id}/token", json={"grace_s": 0}, headers=ADMIN
            )
            tokens.append((await response.json())["token"])

        # The first token is forgotten; the one rotated away last is still recognised.
        for token, code in zip(tokens[:-1], ("unauthorized", "token_rotated"), strict=True):
            response = await registry.client.post(
                "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=bearer(token)
            )
            await assert_error(response, 401, code)
        await registry.heartbeat(Workspace(workspace.id, tokens[-1]))

    async def test_near_miss_admin_tokens_are_refused_alike(self, world: World) -> None:
        near_misses = {
            "first-char": _flip(ADMIN_TOKEN[0]) + ADMIN_TOKEN[1:],
            "last-char": ADMIN_TOKEN[:-1] + _flip(ADMIN_TOKEN[-1]),
            "prefix": ADMIN_TOKEN[:-1],
            "extended": ADMIN_TOKEN + "0",
            "upper-case": ADMIN_TOKEN.upper(),
        }
        answers = {}
        for label, token in near_misses.items():
            response = await world.registry.client.get("/workspaces", headers=bearer(token))
            answers[label] = (response.status, await assert_error(response, 401, "unauthorized"))

        assert len({repr(answer) for answer in answers.values()}) == 1, answers
        for label, token in near_misses.items():
            assert not auth.is_admin_token(token, ADMIN_TOKEN), label


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(ConnectionRefusedError("down (test)"), id="connection-refused"),
        pytest.param(TimeoutError(), id="checkout-timeout"),
        pytest.param(asyncpg.exceptions.CannotConnectNowError("starting up"), id="starting-up"),
        pytest.param(asyncpg.exceptions.InterfaceError("pool is closed"), id="pool-closed"),
    ],
)
async def test_auth_fails_closed_when_the_database_is_unreachable(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    workspace = await registry.create_workspace()
    other = await registry.create_workspace()
    client = registry.client
    beat = {"workspace_id": workspace.id}

    with database_down(monkeypatch, failure):
        own = await client.post("/registry/heartbeat", json=beat, headers=workspace.auth)
        stolen = await client.post("/registry/heartbeat", json=beat, headers=other.auth)
        forged = await client.post("/registry/register", json=beat, headers=bearer("rwt_forged"))
        admin = await client.get(f"/workspaces/{workspace.id}", headers=ADMIN)
        anonymous = await client.get(f"/workspaces/{workspace.id}")
        for response in (own, stolen, forged, admin):
            await assert_error(response, 503, "database_unavailable")
            assert int(response.headers["Retry-After"]) > 0
        # The admin gate needs no database: a missing token is still a 401, never a pass.
        await assert_error(anonymous, 401, "unauthorized")

    row = await registry.db.fetchrow(
        "SELECT status, last_heartbeat_at FROM workspaces WHERE id = $1", uuid.UUID(workspace.id)
    )
    assert row is not None
    assert (row["status"], row["last_heartbeat_at"]) == ("provisioning", None)
    await registry.heartbeat(workspace)  # and it recovers by itself


# --- tokens never kept in clear, never logged -----------------------------------------------


async def full_workflow(registry: Registry, plugin_sources: Path) -> list[str]:
    """Everything a token goes through, errors included; returns every token issued."""
    plugin = write_tree(plugin_sources / "p", {"p.py": "print('p')\n"})
    client = registry.client
    first = await registry.create_workspace(
        [{"source": f"file://{plugin}"}], url="http://127.0.0.1:9"
    )
    second = await registry.create_workspace()
    # Register before the first beat: a register while online counts as a restart, and one
    # that lands after the runner claimed the online reconcile queues another, deferred by
    # restart_reconcile_every_s, which `settled` would wait for in vain (seen under load).
    await client.post(
        "/registry/register",
        json={"workspace_id": first.id, "url": "http://127.0.0.1:9", "agent_card": {"n": 1}},
        headers=first.auth,
    )
    await registry.heartbeat(first, error_rate=0.1, sample_error="boom", plugins=[])
    await registry.settled(first)
    rotated = await client.post(f"/workspaces/{first.id}/token", json={"grace_s": 0}, headers=ADMIN)
    new_token = (await rotated.json())["token"]
    # Refused requests of every kind, each carrying a token.
    for headers, body in [
        (first.auth, {"workspace_id": first.id}),  # rotated away: 401
        (second.auth, {"workspace_id": first.id}),  # another workspace's: 403
        (bearer(new_token), {"workspace_id": first.id, "error_rate": 7}),  # 400
        (bearer(new_token), b"{not json"),  # 400
        (bearer(new_token + "x"), {"workspace_id": first.id}),  # 401
    ]:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        response = await client.post("/registry/heartbeat", headers=headers, **kwargs)
        assert 400 <= response.status < 500
    # The refusals are written to their workspaces (and logged) too: no token in either.
    await client.app[REFUSALS].flush(registry.db)
    for headers in (bearer(new_token), bearer(ADMIN_TOKEN + "x"), {"Authorization": ADMIN_TOKEN}):
        response = await client.get("/workspaces", headers=headers)
        assert response.status == 401
    created = await client.post(
        "/tokens", json={"name": "workflow-ops", "role": "operate"}, headers=ADMIN
    )
    api_secret = (await created.json())["secret"]
    operate = bearer(api_secret)
    await client.get("/tokens", headers=ADMIN)
    await client.post(f"/workspaces/{second.id}/pause", headers=operate)
    await client.post(f"/workspaces/{second.id}/resume", headers=operate)
    await client.post(f"/internal/workspaces/{first.id}/reconcile", json={}, headers=operate)
    await client.post("/internal/plugins/reconcile", json={"name": "p"}, headers=operate)
    await client.get(f"/workspaces/{first.id}/events", headers=operate)
    refused = await client.get("/tokens", headers=operate)  # 403: not admin
    assert refused.status == 403
    await client.delete(f"/workspaces/{second.id}", headers=operate)
    await client.delete("/tokens/workflow-ops", headers=ADMIN)
    for headers in (operate, bearer(api_secret + "x")):
        response = await client.get("/workspaces", headers=headers)
        assert response.status == 401
    gone = await client.post(
        "/registry/heartbeat", json={"workspace_id": second.id}, headers=second.auth
    )
    assert gone.status == 410
    await registry.settled(first)
    return [first.token, second.token, new_token, ADMIN_TOKEN, api_secret]


TEXTUAL_TYPES = ("text", "character varying", "character", "json", "jsonb", "bytea", "ARRAY")


async def test_the_database_keeps_no_token_in_clear(
    registry: Registry, plugin_sources: Path
) -> None:
    tokens = await full_workflow(registry, plugin_sources)
    columns = await registry.db.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND data_type = ANY($1::text[])",
        list(TEXTUAL_TYPES),
    )
    assert {c["table_name"] for c in columns} >= {"workspaces", "workspace_events"}

    found = []
    for column in columns:
        table, name = column["table_name"], column["column_name"]
        if column["data_type"] == "bytea":
            predicate = f"position(convert_to($1, 'UTF8') in \"{name}\") > 0"
        else:
            predicate = f'strpos("{name}"::text, $1) > 0'
        for token in tokens:
            # The whole token, and its secret part (an API token's handle is not secret).
            for needle in (token, token.removeprefix(auth.WORKSPACE_TOKEN_PREFIX)[-32:]):
                hits = await registry.db.fetchval(
                    f'SELECT count(*) FROM "{table}" WHERE {predicate}', needle
                )
                if hits:
                    found.append((table, name, needle[:8]))

    assert found == []


async def test_tokens_never_reach_the_logs(
    registry: Registry, plugin_sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    tokens = await full_workflow(registry, plugin_sources)

    assert caplog.records, "the workflow logged nothing: the check would prove nothing"
    for record in caplog.records:
        rendered = f"{record.getMessage()} {record.__dict__!r}"
        for token in tokens:
            assert token not in rendered, f"{record.name}: {record.getMessage()}"
