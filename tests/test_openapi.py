"""registry/openapi.json describes the service as it behaves.

- the served document is valid OpenAPI 3.1;
- the router and the document list the same operations, named alike, with the right security;
- every (operation, status) the document lists is produced by a real request, and every body
  the service returns validates against the schema documented for its status;
- request-body schemas accept exactly what the handlers accept (for what a schema can say).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012

import registry as registry_package
from registry.auth import PUBLIC_ROUTES, UI_ROUTES, WORKSPACE_TOKEN_ROUTES, required_role
from registry.handlers import operations as operations_handlers
from registry.plugins import SourceSettings, parse_source
from registry.plugins.sources import default_plugin_name, validate_plugin_name
from registry.startup import stand_in
from tests.support import ADMIN, ADMIN_TOKEN, Registry, Workspace, bearer, write_tree

SPEC_FILE = Path(registry_package.__file__).parent / "openapi.json"
SPEC_URI = "urn:registry:openapi"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC_FILE.read_text())
    return spec


def pointer(*parts: str) -> str:
    """A URI fragment for a JSON pointer to `parts` (escaped for both)."""
    escaped = (part.replace("~", "~0").replace("/", "~1") for part in parts)
    return quote("/" + "/".join(escaped), safe="/~")


def documented_operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


class Conformance:
    """Validates responses against the document and records which statuses were seen."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self.schemas = SchemaRegistry().with_resource(SPEC_URI, resource)
        self.operations = documented_operations(spec)
        self.by_id = {op["operationId"]: key for key, op in self.operations.items()}
        self.seen: set[tuple[str, str]] = set()

    def validator(self, fragment: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"{SPEC_URI}#{fragment}"},
            registry=self.schemas,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    def errors(self, fragment: str, instance: Any) -> list[str]:
        found = self.validator(fragment).iter_errors(instance)
        return sorted(f"{list(e.absolute_path)}: {e.message}" for e in found)

    def request_errors(self, operation_id: str, body: Any) -> list[str]:
        method, path = self.by_id[operation_id]
        fragment = pointer(
            "paths", path, method.lower(), "requestBody", "content", "application/json", "schema"
        )
        return self.errors(fragment, body)

    def error_schema_errors(self, body: Any) -> list[str]:
        return self.errors(pointer("components", "schemas", "Error"), body)

    async def check(self, response: ClientResponse, operation_id: str) -> Any:
        """Assert the status is documented for the operation and the body matches its schema."""
        method, path = self.by_id[operation_id]
        operation = self.operations[(method, path)]
        status = str(response.status)
        streaming = response.content_type == "text/event-stream"
        text = "" if streaming else await response.text()
        assert status in operation["responses"], (
            f"{operation_id} answered {status}, which the document does not list: {text}"
        )
        documented = operation["responses"][status]
        base: tuple[str, ...] = ("paths", path, method.lower(), "responses", status)
        if "$ref" in documented:
            name = documented["$ref"].rsplit("/", 1)[-1]
            base = ("components", "responses", name)
            documented = self.spec["components"]["responses"][name]
        self.seen.add((operation_id, status))
        if response.content_type == "text/event-stream":
            # A stream that stays open: the caller reads and checks its frames.
            assert response.content_type in documented["content"]
            return None
        for header, spec in documented.get("headers", {}).items():
            if "$ref" in spec:
                spec = self.spec["components"]["headers"][spec["$ref"].rsplit("/", 1)[-1]]
            if spec.get("required"):
                assert header in response.headers, f"{operation_id} {status}: no {header}"
            if header in response.headers and spec["schema"]["type"] == "integer":
                value = int(response.headers[header])
                assert value >= spec["schema"].get("minimum", value)
        content = documented.get("content")
        if content is None:
            assert not text, f"{operation_id} {status}: undocumented body {text}"
            return None
        assert response.content_type in content, (
            f"{operation_id} {status}: content type {response.content_type}"
        )
        body = json.loads(text) if response.content_type.endswith("json") else text
        fragment = pointer(*base, "content", response.content_type, "schema")
        errors = self.errors(fragment, body)
        assert not errors, f"{operation_id} {status} does not match its schema: {errors}\n{body}"
        return body

    def all_documented(self) -> set[tuple[str, str]]:
        return {
            (op["operationId"], status)
            for op in self.operations.values()
            for status in op["responses"]
        }


@pytest.fixture
def conformance() -> Conformance:
    return Conformance(load_spec())


# --- the document itself -------------------------------------------------------------------


async def test_served_document_is_valid_openapi_3_1(registry: Registry) -> None:
    response = await registry.client.get("/openapi.json")

    assert response.status == 200
    assert response.content_type == "application/json"
    served = await response.json()
    assert served == load_spec()
    assert served["openapi"].startswith("3.1.")
    validate_openapi(served)


def test_every_schema_in_the_document_is_a_valid_2020_12_schema() -> None:
    spec = load_spec()
    for name, schema in spec["components"]["schemas"].items():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"components/schemas/{name}: {exc}") from exc


async def test_router_and_document_list_the_same_operations(registry: Registry) -> None:
    routes = {
        (route.method, route.resource.canonical): route.name
        for route in registry.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        key: operation["operationId"]
        for key, operation in documented_operations(load_spec()).items()
    }

    assert set(routes) - set(documented) == set(), "routes missing from the document"
    assert set(documented) - set(routes) == set(), "documented operations with no route"
    assert routes == documented, "operationId must equal the route name"


def test_security_matches_the_auth_rules() -> None:
    spec = load_spec()
    assert set(spec["components"]["securitySchemes"]) == {"adminToken", "workspaceToken"}
    for scheme in spec["components"]["securitySchemes"].values():
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for (method, path), operation in documented_operations(spec).items():
        name = operation["operationId"]
        if name in PUBLIC_ROUTES or name in UI_ROUTES:
            expected: list[dict[str, list[str]]] = []
        elif name in WORKSPACE_TOKEN_ROUTES:
            expected = [{"workspaceToken": []}]
        else:
            expected = [{"adminToken": []}]
        assert operation.get("security") == expected, f"{method} {path}"
        # The role documented is the role the gate enforces.
        role = required_role(name).value if expected == [{"adminToken": []}] else None
        assert operation.get("x-required-role") == role, f"{method} {path}"
        assert operation.get("description"), f"{method} {path} has no description"
        if expected:
            assert "401" in operation["responses"], f"{method} {path} does not list 401"


def test_plugin_source_schemes_are_documented() -> None:
    description = load_spec()["components"]["schemas"]["PluginSource"]["description"]
    for scheme in ("file://", "git+", "github://owner/repo[/subdir]#", "gitea://host/owner/"):
        assert scheme in description


# Built once: hypothesis 6.170 reports "inconsistent data generation" when a test builds
# this (large) regex strategy afresh inside each example.
DOCUMENTED_SOURCES = st.from_regex(
    load_spec()["components"]["schemas"]["PluginSource"]["pattern"], fullmatch=True
).filter(lambda x: len(x) <= 2048)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=DOCUMENTED_SOURCES)
def test_every_source_the_pattern_admits_is_one_the_server_accepts(raw: str) -> None:
    """The PluginSource pattern is a promise: a source matching it parses and names a plugin
    (registry/plugins/sources.py), so a client generating from the document is not refused."""
    source = parse_source(raw, SourceSettings())
    validate_plugin_name(default_plugin_name(source))


@pytest.mark.parametrize(
    "body",
    [
        {"source": "github://a/b#main", "name": "b"},
        {"source": "github://a/b#main", "name": ""},
        {"source": "", "name": "b"},
        {"source": None, "name": None},
        {"name": "b"},
        {},
    ],
)
def test_plugins_reconcile_request_branches_exclude_each_other(body: dict[str, Any]) -> None:
    """`oneOf` only says "exactly one" when no instance can match two branches."""
    spec = load_spec()
    conformance = Conformance(spec)
    branches = spec["components"]["schemas"]["PluginsReconcileRequest"]["oneOf"]
    matching = [
        index
        for index in range(len(branches))
        if not conformance.errors(
            pointer("components", "schemas", "PluginsReconcileRequest", "oneOf", str(index)), body
        )
    ]
    assert len(matching) <= 1


async def test_fleet_counts_only_statuses_that_have_workspaces(
    registry: Registry, conformance: Conformance
) -> None:
    """With no tombstone, `removed` is absent like every other empty status (it was 0, which
    the document's `minimum: 1` refuses)."""
    await registry.create_workspace()

    fleet = await conformance.check(await registry.client.get("/fleet", headers=ADMIN), "get_fleet")

    assert fleet["statuses"] == {"provisioning": 1}


# --- conformance: every documented response, produced for real ----------------------------


@contextlib.contextmanager
def database_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every pool checkout fails as it does when PostgreSQL cannot be reached."""

    async def refuse(self: asyncpg.pool.PoolAcquireContext[Any]) -> Any:
        raise ConnectionRefusedError("database down (test)")

    with monkeypatch.context() as patch:
        patch.setattr(asyncpg.pool.PoolAcquireContext, "__aenter__", refuse)
        yield


def oversize(registry: Registry) -> bytes:
    return b'{"name": "' + b"x" * (registry.settings.max_body_bytes + 1) + b'"}'


NO_AUTH: dict[str, str] = {}
JSON = {"Content-Type": "application/json"}


async def read_frames(response: ClientResponse, count: int) -> list[dict[str, str]]:
    """The first `count` Server-Sent Events frames that carry data."""
    frames: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(20):
        while len(frames) < count:
            line = (await response.content.readline()).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if not line:
                if "data" in fields:
                    frames.append(fields)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return frames


async def queue_future_run(registry: Registry, workspace: Workspace) -> str:
    """A queued reconcile the worker will not claim for an hour."""
    value = await registry.db.fetchval(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'manual', now() + interval '1 hour') RETURNING id",
        uuid.UUID(workspace.id),
    )
    return str(value)


async def test_every_documented_response_is_produced_and_conforms(
    registry: Registry,
    plugin_sources: Path,
    conformance: Conformance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = registry.client
    check = conformance.check
    plugin_dir = write_tree(plugin_sources / "seo-all", {"plugin.py": "print('seo')\n"})
    allowed = f"file://{plugin_dir}"
    missing_id = str(uuid.uuid4())

    # Operational endpoints.
    for operation_id, path in [
        ("get_healthz", "/healthz"),
        ("get_buildinfo", "/buildinfo"),
        ("get_openapi", "/openapi.json"),
        ("get_metrics", "/metrics"),
        ("get_readyz", "/readyz"),
    ]:
        await check(await client.get(path), operation_id)
        # They document no error of their own; a wrong method still gets the envelope.
        wrong_method = await client.post(path)
        assert wrong_method.status == 405
        assert not conformance.error_schema_errors(await wrong_method.json())

    await _check_dashboard_routes(client, check)

    async def pending(conn: Any) -> list[str]:
        return ["9999_not_applied.sql"]

    with monkeypatch.context() as patch:
        patch.setattr(operations_handlers, "pending_migrations", pending)
        body = await check(await client.get("/readyz"), "get_readyz")
        assert body["error"]["code"] == "migrations_pending"
    with database_down(monkeypatch):
        body = await check(await client.get("/readyz"), "get_readyz")
        assert body["error"]["code"] == "database_unavailable"

    # POST /workspaces
    create = {"name": "seo-agent", "plugins": [{"source": allowed}]}
    assert not conformance.request_errors("post_workspaces", create)
    created = await check(
        await client.post("/workspaces", json=create, headers=ADMIN), "post_workspaces"
    )
    workspace = Workspace(created["workspace"]["id"], created["token"])
    other = await registry.create_workspace()
    for body, headers, status in [
        ({"name": " "}, ADMIN, 400),
        (create, NO_AUTH, 401),
        ({"name": "a", "plugins": [{"source": "file:///etc"}]}, ADMIN, 403),
    ]:
        response = await client.post("/workspaces", json=body, headers=headers)
        assert response.status == status
        await check(response, "post_workspaces")
    response = await client.post("/workspaces", data=oversize(registry), headers=ADMIN)
    assert response.status == 413
    await check(response, "post_workspaces")
    taken = await client.post("/workspaces", json=create, headers=ADMIN)
    assert taken.status == 409
    assert (await check(taken, "post_workspaces"))["error"]["workspace_id"] == workspace.id

    # GET /workspaces/by-name/{name}
    shown = await check(
        await client.get("/workspaces/by-name/seo-agent", headers=ADMIN), "get_workspace_by_name"
    )
    assert shown["id"] == workspace.id
    for path, headers, status in [
        ("/workspaces/by-name/seo-agent", NO_AUTH, 401),
        ("/workspaces/by-name/nobody", ADMIN, 404),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_workspace_by_name")

    # PATCH and PUT /workspaces/{id}/labels
    for operation_id, method, body in [
        ("patch_workspace_labels", "PATCH", {"labels": {"env": "prod", "gone": None}}),
        ("put_workspace_labels", "PUT", {"labels": {"env": "prod"}}),
    ]:
        assert not conformance.request_errors(operation_id, body)
        path = f"/workspaces/{other.id}/labels"
        shown = await check(
            await client.request(method, path, json=body, headers=ADMIN), operation_id
        )
        assert shown["labels"] == {"env": "prod"}
        for target, sent, headers, status in [
            (path, {"labels": {"Bad_": "x"}}, ADMIN, 400),
            (path, body, NO_AUTH, 401),
            (f"/workspaces/{missing_id}/labels", body, ADMIN, 404),
        ]:
            response = await client.request(method, target, json=sent, headers=headers)
            assert response.status == status
            await check(response, operation_id)
        response = await client.request(method, path, data=oversize(registry), headers=ADMIN)
        assert response.status == 413
        await check(response, operation_id)

    # GET /workspaces/{id}, provisioning.
    shown = await check(
        await client.get(f"/workspaces/{workspace.id}", headers=ADMIN), "get_workspace"
    )
    assert shown["status"] == "provisioning"
    assert shown["why"]
    for path, headers, status in [
        (f"/workspaces/{workspace.id}", workspace.auth, 401),
        (f"/workspaces/{missing_id}", ADMIN, 404),
        ("/workspaces/not-a-uuid", ADMIN, 404),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_workspace")

    # POST /internal/workspaces/{id}/reconcile on a provisioning workspace: 409.
    response = await client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", json={}, headers=ADMIN
    )
    assert response.status == 409
    await check(response, "post_workspace_reconcile")

    # POST /registry/register: the first contact flips it online and installs the plugin.
    register = {
        "workspace_id": workspace.id,
        "url": "http://127.0.0.1:9/",
        "agent_card": {"name": "seo-agent", "skills": ["seo"]},
    }
    assert not conformance.request_errors("post_register", register)
    beat = await check(
        await client.post("/registry/register", json=register, headers=workspace.auth),
        "post_register",
    )
    assert (beat["previous_status"], beat["status"]) == ("provisioning", "online")
    await registry.settled(workspace)

    # POST /registry/heartbeat: the restart action is repeated until acked.
    heartbeat = {"workspace_id": workspace.id, "error_rate": 0.0, "runtime_state": "ok"}
    assert not conformance.request_errors("post_heartbeat", heartbeat)
    beat = await check(
        await client.post("/registry/heartbeat", json=heartbeat, headers=workspace.auth),
        "post_heartbeat",
    )
    assert [a["type"] for a in beat["actions"]] == ["restart"]
    acked = {
        **heartbeat,
        "plugins": [{"name": "seo-all", "sha": ""}],
        "acks": [beat["actions"][0]["id"]],
    }
    assert not conformance.request_errors("post_heartbeat", acked)
    beat = await check(
        await client.post("/registry/heartbeat", json=acked, headers=workspace.auth),
        "post_heartbeat",
    )
    assert beat["actions"] == []

    removed = await registry.create_workspace()
    await registry.set_status(removed, "removed")
    for operation_id, path in [
        ("post_heartbeat", "/registry/heartbeat"),
        ("post_register", "/registry/register"),
    ]:
        for body, headers, status in [
            ({"workspace_id": workspace.id, "url": 5, "error_rate": 2}, workspace.auth, 400),
            ({"workspace_id": workspace.id}, NO_AUTH, 401),
            ({"workspace_id": workspace.id}, bearer("rwt_matches_nothing"), 401),
            ({"workspace_id": workspace.id}, other.auth, 403),
            ({"workspace_id": removed.id}, removed.auth, 410),
        ]:
            response = await client.post(path, json=body, headers=headers)
            assert response.status == status, await response.text()
            await check(response, operation_id)
        response = await client.post(path, data=oversize(registry), headers=workspace.auth)
        assert response.status == 413
        await check(response, operation_id)

    # GET /workspaces/{id}, online with an installed, observed plugin and a finished run.
    shown = await check(
        await client.get(f"/workspaces/{workspace.id}", headers=ADMIN), "get_workspace"
    )
    assert shown["installed_plugins"]
    assert shown["observed_plugins"]
    assert shown["last_reconcile"]["steps"]

    # GET /internal/workspaces/{id}/reconciles
    listed = await check(
        await client.get(f"/internal/workspaces/{workspace.id}/reconciles?limit=5", headers=ADMIN),
        "get_workspace_reconciles",
    )
    run_id = listed["reconciles"][0]["id"]
    for path, headers, status in [
        (f"/internal/workspaces/{workspace.id}/reconciles?limit=0", ADMIN, 400),
        (f"/internal/workspaces/{workspace.id}/reconciles?limit=x", ADMIN, 400),
        (f"/internal/workspaces/{workspace.id}/reconciles", NO_AUTH, 401),
        (f"/internal/workspaces/{missing_id}/reconciles", ADMIN, 404),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_workspace_reconciles")

    # GET /internal/reconciles/{id}
    run = await check(
        await client.get(f"/internal/reconciles/{run_id}", headers=ADMIN), "get_reconcile"
    )
    assert run["steps"]
    for path, headers, status in [
        (f"/internal/reconciles/{run_id}", workspace.auth, 401),
        (f"/internal/reconciles/{missing_id}", ADMIN, 404),
        ("/internal/reconciles/nope", ADMIN, 404),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_reconcile")

    # POST /internal/workspaces/{id}/reconcile: 202 new, 200 when one is already queued.
    path = f"/internal/workspaces/{workspace.id}/reconcile"
    assert not conformance.request_errors("post_workspace_reconcile", {"refresh": True})
    requested = await check(
        await client.post(path, json={"refresh": True}, headers=ADMIN),
        "post_workspace_reconcile",
    )
    assert requested["reconcile"]["trigger"] == "manual"
    await registry.settled(workspace)
    await registry.set_status(other, "online")
    queued_id = await queue_future_run(registry, other)
    response = await client.post(f"/internal/workspaces/{other.id}/reconcile", headers=ADMIN)
    assert response.status == 200
    assert (await check(response, "post_workspace_reconcile"))["reconcile"]["id"] == queued_id
    for target, body, headers, status in [
        (path, {"refresh": "yes"}, ADMIN, 400),
        (path, {}, NO_AUTH, 401),
        (f"/internal/workspaces/{missing_id}/reconcile", {}, ADMIN, 404),
    ]:
        response = await client.post(target, json=body, headers=headers)
        assert response.status == status
        await check(response, "post_workspace_reconcile")
    response = await client.post(path, data=oversize(registry), headers=ADMIN)
    assert response.status == 413
    await check(response, "post_workspace_reconcile")

    # PUT /workspaces/{id}/plugins: replacing the set reconciles an online workspace.
    path = f"/workspaces/{workspace.id}/plugins"
    replace = {"plugins": [{"source": allowed, "name": "seo-renamed"}]}
    assert not conformance.request_errors("put_workspace_plugins", replace)
    shown = await check(
        await client.put(path, json=replace, headers=ADMIN), "put_workspace_plugins"
    )
    assert [p["name"] for p in shown["declared_plugins"]] == ["seo-renamed"]
    await registry.settled(workspace)
    for target, body, headers, status in [
        (path, {}, ADMIN, 400),
        (path, replace, NO_AUTH, 401),
        (path, {"plugins": [{"source": "file:///etc"}]}, ADMIN, 403),
        (f"/workspaces/{missing_id}/plugins", replace, ADMIN, 404),
        (f"/workspaces/{removed.id}/plugins", replace, ADMIN, 409),
    ]:
        response = await client.put(target, json=body, headers=headers)
        assert response.status == status
        await check(response, "put_workspace_plugins")
    response = await client.put(path, data=oversize(registry), headers=ADMIN)
    assert response.status == 413
    await check(response, "put_workspace_plugins")

    # POST /internal/plugins/reconcile: fans out to every live workspace declaring it.
    fan_out = {"source": allowed}
    assert not conformance.request_errors("post_plugins_reconcile", fan_out)
    result = await check(
        await client.post("/internal/plugins/reconcile", json=fan_out, headers=ADMIN),
        "post_plugins_reconcile",
    )
    assert result == {"queued": 1}
    await registry.settled(workspace)
    for body, headers, status in [
        ({"source": allowed, "name": "seo-renamed"}, ADMIN, 400),
        ({"name": "seo-renamed"}, NO_AUTH, 401),
    ]:
        response = await client.post("/internal/plugins/reconcile", json=body, headers=headers)
        assert response.status == status
        await check(response, "post_plugins_reconcile")
    response = await client.post(
        "/internal/plugins/reconcile", data=oversize(registry), headers=ADMIN
    )
    assert response.status == 413
    await check(response, "post_plugins_reconcile")

    # GET /workspaces
    listed = await check(
        await client.get("/workspaces?status=online&limit=1", headers=ADMIN), "get_workspaces"
    )
    assert listed["next_cursor"] is not None
    listed = await check(
        await client.get(f"/workspaces?cursor={listed['next_cursor']}", headers=ADMIN),
        "get_workspaces",
    )
    listed = await check(
        await client.get(
            "/workspaces?status=online,paused&plugins_sync=synced,out_of_sync&has=refusal"
            "&selector=env%3Dprod,tier!%3Dcanary&name_prefix=seo&include_removed=true",
            headers=ADMIN,
        ),
        "get_workspaces",
    )
    for query, headers, status in [
        ("?selector=env%3D%3D%3D", ADMIN, 400),
        ("?plugin_sync=failed", ADMIN, 400),
        ("?status=asleep", ADMIN, 400),
        ("?cursor=nope", ADMIN, 400),
        ("?limit=501", ADMIN, 400),
        ("", NO_AUTH, 401),
    ]:
        response = await client.get(f"/workspaces{query}", headers=headers)
        assert response.status == status
        await check(response, "get_workspaces")

    # Pause, resume, token rotation and removal.
    for operation_id, action in [("post_pause", "pause"), ("post_resume", "resume")]:
        shown = await check(
            await client.post(f"/workspaces/{other.id}/{action}", headers=ADMIN), operation_id
        )
        assert shown["status"] == {"pause": "paused", "resume": "offline"}[action]
        for target, headers, status in [
            (other.id, NO_AUTH, 401),
            (missing_id, ADMIN, 404),
            ({"pause": removed.id, "resume": other.id}[action], ADMIN, 409),
        ]:
            response = await client.post(f"/workspaces/{target}/{action}", headers=headers)
            assert response.status == status
            await check(response, operation_id)
    rotated = await check(
        await client.post(f"/workspaces/{other.id}/token", headers=ADMIN), "post_token"
    )
    assert rotated["workspace_id"] == other.id
    for target, headers, status in [
        (other.id, NO_AUTH, 401),
        (missing_id, ADMIN, 404),
        (removed.id, ADMIN, 409),
    ]:
        response = await client.post(f"/workspaces/{target}/token", headers=headers)
        assert response.status == status
        await check(response, "post_token")
    bad_grace = await client.post(
        f"/workspaces/{other.id}/token", json={"grace_s": -1}, headers=ADMIN
    )
    assert bad_grace.status == 400
    await check(bad_grace, "post_token")
    doomed = await registry.create_workspace()
    for target, headers, status in [
        (doomed.id, ADMIN, 204),
        (doomed.id, NO_AUTH, 401),
        (missing_id, ADMIN, 404),
    ]:
        response = await client.delete(f"/workspaces/{target}", headers=headers)
        assert response.status == status
        await check(response, "delete_workspace")

    for operation_id, method in [
        ("patch_workspace_labels", "PATCH"),
        ("put_workspace_labels", "PUT"),
    ]:
        response = await client.request(
            method, f"/workspaces/{removed.id}/labels", json={"labels": {}}, headers=ADMIN
        )
        assert response.status == 409
        await check(response, operation_id)

    # GET /workspaces/{id}/events
    history = await check(
        await client.get(f"/workspaces/{workspace.id}/events?limit=500", headers=ADMIN),
        "get_workspace_events",
    )
    assert {e["kind"] for e in history["events"]} >= {"status", "reconcile"}
    for path, headers, status in [
        (f"/workspaces/{workspace.id}/events?after=-1", ADMIN, 400),
        (f"/workspaces/{workspace.id}/events", {**ADMIN, "Last-Event-ID": "x"}, 400),
        (f"/workspaces/{workspace.id}/events", NO_AUTH, 401),
        (f"/workspaces/{missing_id}/events", ADMIN, 404),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_workspace_events")

    # GET /events: a stream of frames whose data is an Event.
    response = await client.get(f"/events?after=0&workspace_id={workspace.id}", headers=ADMIN)
    await check(response, "get_events")
    frames = await read_frames(response, count=2)
    response.close()
    # Each frame is the documented event object, and its `data` is JSON matching the schema
    # its `contentSchema` names (a keyword validators treat as an annotation only).
    frame_schema = conformance.spec["components"]["schemas"]["EventStreamFrame"]
    data_schema = frame_schema["properties"]["data"]
    assert data_schema["contentMediaType"] == "application/json"
    for frame in frames:
        assert not conformance.errors(pointer("components", "schemas", "EventStreamFrame"), frame)
        data = json.loads(frame["data"])
        fragment = data_schema["contentSchema"]["$ref"].removeprefix("#")
        assert not conformance.errors(fragment, data), data
        assert (frame["id"], frame["event"]) == (str(data["id"]), data["kind"])
    for path, headers, status in [
        ("/events?workspace_id=nope", ADMIN, 400),
        ("/events?after=x", ADMIN, 400),
        ("/events", NO_AUTH, 401),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_events")

    # GET /events/history: pages of events with their workspace's name; 410 before pruning.
    fleet_history = await check(
        await client.get("/events/history?limit=500", headers=ADMIN), "get_event_history"
    )
    assert "seo-agent" in {e["workspace_name"] for e in fleet_history["events"]}
    await registry.db.execute("UPDATE retention_state SET events_pruned_through = 2")
    for path, headers, status in [
        (f"/events/history?workspace_id={workspace.id}", ADMIN, 200),
        ("/events/history?after=-1", ADMIN, 400),
        ("/events/history", NO_AUTH, 401),
        (f"/events/history?workspace_id={missing_id}", ADMIN, 200),
        ("/events/history?after=1", ADMIN, 410),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_event_history")
    await registry.db.execute("UPDATE retention_state SET events_pruned_through = 0")

    # GET /fleet
    fleet = await check(await client.get("/fleet", headers=ADMIN), "get_fleet")
    assert fleet["statuses"]["removed"] == 2
    response = await client.get("/fleet", headers=NO_AUTH)
    assert response.status == 401
    await check(response, "get_fleet")

    # GET /fleet/history
    points = await check(await client.get("/fleet/history", headers=ADMIN), "get_fleet_history")
    assert len(points["points"]) == 61
    for path, headers, status in [
        ("/fleet/history?minutes=0", ADMIN, 400),
        ("/fleet/history", NO_AUTH, 401),
    ]:
        response = await client.get(path, headers=headers)
        assert response.status == status
        await check(response, "get_fleet_history")

    # POST /tokens, GET /tokens: the secret shown once, never listed.
    token_request = {"name": "conformance-reader", "role": "read"}
    assert not conformance.request_errors("post_tokens", token_request)
    made = await check(
        await client.post("/tokens", json=token_request, headers=ADMIN), "post_tokens"
    )
    reader = bearer(made["secret"])
    for body, headers, status in [
        ({"name": "no-role"}, ADMIN, 400),
        (token_request, NO_AUTH, 401),
        (token_request, reader, 403),
        (token_request, ADMIN, 409),
    ]:
        response = await client.post("/tokens", json=body, headers=headers)
        assert response.status == status, await response.text()
        await check(response, "post_tokens")
    response = await client.post("/tokens", data=oversize(registry), headers=ADMIN)
    assert response.status == 413
    await check(response, "post_tokens")
    listed = await check(await client.get("/tokens", headers=ADMIN), "get_tokens")
    assert [t["name"] for t in listed["tokens"]] == ["conformance-reader"]
    assert made["secret"] not in json.dumps(listed)
    for query, headers, status in [
        ("?include_revoked=maybe", ADMIN, 400),
        ("", NO_AUTH, 401),
        ("", reader, 403),
    ]:
        response = await client.get(f"/tokens{query}", headers=headers)
        assert response.status == status
        await check(response, "get_tokens")
    # Every operation that needs more than `read` refuses the read token with its 403.
    for (method, path), operation in conformance.operations.items():
        if operation.get("x-required-role") in ("operate", "admin"):
            target = path.replace("{id}", missing_id)
            response = await client.request(method, target, json={}, headers=reader)
            assert response.status == 403, f"{method} {path}: {await response.text()}"
            await check(response, operation["operationId"])

    # POST /fleet/guard/ack: a 409 while the guard is not holding, 200 while it holds.
    for body, headers, status in [
        (None, ADMIN, 409),
        ({"please": True}, ADMIN, 400),
        (None, NO_AUTH, 401),
    ]:
        response = await client.post("/fleet/guard/ack", json=body, headers=headers)
        assert response.status == status, await response.text()
        await check(response, "post_guard_ack")
    response = await client.post("/fleet/guard/ack", data=oversize(registry), headers=ADMIN)
    assert response.status == 413
    await check(response, "post_guard_ack")
    await registry.db.execute("UPDATE fleet_guard SET holding = true, since = now()")
    acked = await check(await client.post("/fleet/guard/ack", headers=ADMIN), "post_guard_ack")
    assert acked["mass_expiry_guard"]["acknowledged_by"] == "admin"
    await registry.db.execute("UPDATE fleet_guard SET holding = false, since = NULL")

    # DELETE /tokens/{id}: by name; then it is gone.
    for target, headers, status in [
        ("conformance-reader", NO_AUTH, 401),
        ("conformance-reader", ADMIN, 204),
        ("never-made", ADMIN, 404),
    ]:
        response = await client.delete(f"/tokens/{target}", headers=headers)
        assert response.status == status
        await check(response, "delete_token")

    # 503 with Retry-After wherever the database is needed.
    with database_down(monkeypatch):
        for operation_id, method, path, body, headers in [
            ("post_heartbeat", "POST", "/registry/heartbeat", heartbeat, workspace.auth),
            ("post_register", "POST", "/registry/register", register, workspace.auth),
            ("post_workspaces", "POST", "/workspaces", create, ADMIN),
            ("get_workspace", "GET", f"/workspaces/{workspace.id}", None, ADMIN),
            ("put_workspace_plugins", "PUT", f"/workspaces/{workspace.id}/plugins", replace, ADMIN),
            (
                "post_workspace_reconcile",
                "POST",
                f"/internal/workspaces/{workspace.id}/reconcile",
                {},
                ADMIN,
            ),
            (
                "get_workspace_reconciles",
                "GET",
                f"/internal/workspaces/{workspace.id}/reconciles",
                None,
                ADMIN,
            ),
            ("post_plugins_reconcile", "POST", "/internal/plugins/reconcile", fan_out, ADMIN),
            ("get_reconcile", "GET", f"/internal/reconciles/{run_id}", None, ADMIN),
            ("get_workspaces", "GET", "/workspaces", None, ADMIN),
            ("delete_workspace", "DELETE", f"/workspaces/{other.id}", None, ADMIN),
            ("post_pause", "POST", f"/workspaces/{other.id}/pause", None, ADMIN),
            ("post_resume", "POST", f"/workspaces/{other.id}/resume", None, ADMIN),
            ("post_token", "POST", f"/workspaces/{other.id}/token", None, ADMIN),
            ("get_workspace_events", "GET", f"/workspaces/{other.id}/events", None, ADMIN),
            ("get_events", "GET", "/events", None, ADMIN),
            ("get_event_history", "GET", "/events/history", None, ADMIN),
            ("get_fleet", "GET", "/fleet", None, ADMIN),
            # A window not read yet: the hour read above is answered from memory for 30 s.
            ("get_fleet_history", "GET", "/fleet/history?minutes=7", None, ADMIN),
            ("post_tokens", "POST", "/tokens", token_request, ADMIN),
            ("get_tokens", "GET", "/tokens", None, ADMIN),
            ("delete_token", "DELETE", "/tokens/someone", None, ADMIN),
            ("post_guard_ack", "POST", "/fleet/guard/ack", None, ADMIN),
            ("get_workspace_by_name", "GET", "/workspaces/by-name/seo-agent", None, ADMIN),
            (
                "patch_workspace_labels",
                "PATCH",
                f"/workspaces/{other.id}/labels",
                {"labels": {}},
                ADMIN,
            ),
            (
                "put_workspace_labels",
                "PUT",
                f"/workspaces/{other.id}/labels",
                {"labels": {}},
                ADMIN,
            ),
        ]:
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status == 503, f"{operation_id}: {await response.text()}"
            assert (await check(response, operation_id))["error"]["code"] == (
                "database_unavailable"
            )

    # While the registry starts, its stand-in answers every operation but the process-level
    # ones with 503 `starting` (registry/startup.py); those it serves as the app does.
    async with TestClient(TestServer(stand_in())) as starting:
        for (method, path), operation in conformance.operations.items():
            operation_id = operation["operationId"]
            response = await starting.request(
                method, path.replace("{id}", missing_id), json={}, headers=ADMIN
            )
            if operation_id in ("get_healthz", "get_buildinfo", "get_openapi"):
                assert response.status == 200, operation_id
                await check(response, operation_id)
                continue
            assert response.status == 503, operation_id
            assert (await check(response, operation_id))["error"]["code"] == "starting"

    missing = conformance.all_documented() - conformance.seen
    assert not missing, f"documented responses never produced: {sorted(missing)}"


async def _check_dashboard_routes(client: TestClient[Any, Any], check: Any) -> None:
    """Issue 17's routes: pages, login (every refusal), the session, logout."""
    origin = {"Origin": str(client.make_url("")).rstrip("/")}
    root = await client.get("/", allow_redirects=False)
    assert root.headers["Location"] == "/ui/"
    await check(root, "get_root")
    await check(await client.get("/ui/"), "get_ui")
    # The document names every file the package ships there, and only those.
    spec = load_spec()["paths"]["/ui/static/{name}"]["get"]["parameters"][0]["schema"]
    shipped = Path(registry_package.__file__).parent / "ui" / "static"
    assert sorted(spec["enum"]) == sorted(p.name for p in shipped.iterdir())
    for name in spec["enum"]:
        await check(await client.get(f"/ui/static/{name}"), "get_ui_asset")
    await check(await client.get("/ui/static/nope.js"), "get_ui_asset")
    await check(await client.post("/ui/login", json={"token": "x"}), "post_ui_login")  # 403
    await check(await client.post("/ui/login", json={}, headers=origin), "post_ui_login")
    wrong = await client.post("/ui/login", json={"token": "wrong"}, headers=origin)
    await check(wrong, "post_ui_login")
    await check(await client.get("/ui/session"), "get_ui_session")  # 401
    login = await client.post("/ui/login", json={"token": ADMIN_TOKEN}, headers=origin)
    assert (await check(login, "post_ui_login")) == {"name": "admin", "role": "admin"}
    # Sent by hand: the test client's cookie jar keeps no cookie of an IP address.
    cookie = {"Cookie": f"registry_session={login.cookies['registry_session'].value}"}
    session = await client.get("/ui/session", headers=cookie)
    assert (await check(session, "get_ui_session")) == {"name": "admin", "role": "admin"}
    await check(await client.post("/ui/logout", headers=cookie), "post_ui_logout")  # 403
    await check(await client.post("/ui/logout", headers=origin | cookie), "post_ui_logout")
    assert (await client.get("/ui/session", headers=cookie)).status == 401


# --- request schemas accept what the handlers accept ---------------------------------------

ALLOWED = "<allowed source>"


def substitute(value: Any, allowed: str) -> Any:
    if value == ALLOWED:
        return allowed
    if isinstance(value, dict):
        return {k: substitute(v, allowed) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, allowed) for v in value]
    return value


def case(operation_id: str, body: dict[str, Any], valid: bool, name: str) -> Any:
    return pytest.param(operation_id, body, valid, id=f"{operation_id}-{name}")


ACK = str(uuid.UUID(int=1))
REQUEST_CASES = [
    # Heartbeat; `workspace_id` is filled in.
    case("post_heartbeat", {}, True, "minimal"),
    case("post_heartbeat", {"error_rate": 1, "active_tasks": 1_000_000}, True, "bounds"),
    case("post_heartbeat", {"error_rate": None, "sample_error": None}, True, "nulls"),
    case("post_heartbeat", {"runtime_state": "x" * 64}, True, "state-64"),
    case("post_heartbeat", {"plugins": [{"name": "a", "sha": None}]}, True, "plugin-null-sha"),
    case("post_heartbeat", {"plugins": [], "acks": [ACK]}, True, "acks"),
    case("post_heartbeat", {"error_rate": 1.5}, False, "rate-above-1"),
    case("post_heartbeat", {"error_rate": -0.1}, False, "rate-negative"),
    case("post_heartbeat", {"error_rate": "0.2"}, False, "rate-string"),
    case("post_heartbeat", {"error_rate": True}, False, "rate-bool"),
    case("post_heartbeat", {"active_tasks": -1}, False, "tasks-negative"),
    case("post_heartbeat", {"active_tasks": 1.5}, False, "tasks-float"),
    case("post_heartbeat", {"active_tasks": 1_000_001}, False, "tasks-huge"),
    case("post_heartbeat", {"uptime_seconds": 1e11}, False, "uptime-huge"),
    case("post_heartbeat", {"monthly_spend": -1}, False, "spend-negative"),
    case("post_heartbeat", {"sample_error": "x" * 4097}, False, "long-sample"),
    case("post_heartbeat", {"current_task": "x" * 1025}, False, "long-task"),
    case("post_heartbeat", {"runtime_state": "x" * 65}, False, "long-state"),
    case("post_heartbeat", {"plugins": "seo"}, False, "plugins-not-list"),
    case("post_heartbeat", {"plugins": [{"sha": "x"}]}, False, "plugin-no-name"),
    case("post_heartbeat", {"plugins": [{"name": ""}]}, False, "plugin-empty-name"),
    case("post_heartbeat", {"plugins": [{"name": "a", "v": 1}]}, True, "plugin-unknown"),
    case("post_heartbeat", {"plugins": [{"name": "a"}] * 501}, False, "too-many-plugins"),
    case("post_heartbeat", {"acks": ["not-a-uuid"]}, False, "bad-ack"),
    case("post_heartbeat", {"acks": [ACK] * 101}, False, "too-many-acks"),
    case("post_heartbeat", {"workspace_id": None}, False, "null-workspace-id"),
    case("post_heartbeat", {"workspace_id": "nope"}, False, "bad-workspace-id"),
    case("post_heartbeat", {"colour": "red"}, True, "unknown-field-ignored"),
    case("post_heartbeat", {"sample_error": "a\x00b"}, False, "nul-sample-error"),
    case("post_heartbeat", {"runtime_state": "ok\x00"}, False, "nul-state"),
    case("post_heartbeat", {"plugins": [{"name": "a\x00"}]}, False, "nul-plugin-name"),
    case("post_heartbeat", {"plugins": [{"name": "a", "sha": "\x00"}]}, False, "nul-plugin-sha"),
    case("post_heartbeat", {"active_tasks": 3.0}, True, "tasks-integral-float"),
    # Register; `workspace_id` is filled in.
    case("post_register", {}, True, "minimal"),
    case("post_register", {"url": "https://agent.example", "agent_card": {}}, True, "full"),
    case("post_register", {"url": "", "agent_card": None}, True, "empty-url-null-card"),
    case("post_register", {"url": "ftp://x"}, False, "url-scheme"),
    case("post_register", {"url": 5}, False, "url-type"),
    case("post_register", {"url": "http://["}, False, "url-unparsable"),
    case("post_register", {"url": "http://"}, False, "url-no-host"),
    case("post_register", {"url": "http://h:99999"}, False, "url-port"),
    case("post_register", {"url": "http://[::1]:8080/x"}, True, "url-ipv6"),
    case("post_register", {"url": "http://" + "a" * 2048}, False, "url-long"),
    case("post_register", {"agent_card": "card"}, False, "card-string"),
    case("post_register", {"agent_card": []}, False, "card-array"),
    case("post_register", {"colour": "red"}, True, "unknown-field-ignored"),
    case("post_register", {"id": None}, True, "null-alias"),
    case("post_register", {"url": "http://h/\x00"}, False, "nul-url"),
    case("post_register", {"agent_card": {"skills": ["a\x00"]}}, False, "nul-in-card"),
    case("post_register", {"agent_card": {"k\x00": 1}}, False, "nul-card-key"),
    # Create.
    case("post_workspaces", {"name": "a"}, True, "minimal"),
    case("post_workspaces", {"name": " a ", "delivery": None, "plugins": None}, True, "nulls"),
    case("post_workspaces", {"name": "a", "delivery": "http", "url": "http://h"}, True, "http"),
    case("post_workspaces", {"name": "a", "plugins": [{"source": ALLOWED}]}, True, "plugin"),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": ALLOWED, "name": "p.1_x-y"}]},
        True,
        "named-plugin",
    ),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": ALLOWED, "name": None}]},
        True,
        "null-plugin-name",
    ),
    case("post_workspaces", {}, False, "missing-name"),
    case("post_workspaces", {"name": None}, False, "null-name"),
    case("post_workspaces", {"name": "   "}, False, "blank-name"),
    case("post_workspaces", {"name": 3}, False, "name-type"),
    case("post_workspaces", {"name": "x" * 129}, False, "name-long"),
    case("post_workspaces", {"name": "a", "delivery": "ftp"}, False, "delivery"),
    case("post_workspaces", {"name": "a", "url": "ftp://h"}, False, "url"),
    case("post_workspaces", {"name": "a", "plugins": {}}, False, "plugins-object"),
    case("post_workspaces", {"name": "a", "plugins": [{"name": "x"}]}, False, "no-source"),
    case("post_workspaces", {"name": "a", "plugins": [{"source": ""}]}, False, "empty-source"),
    case("post_workspaces", {"name": "a", "plugins": [{"source": "svn://x/y"}]}, False, "scheme"),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": ALLOWED, "name": "-x"}]},
        False,
        "plugin-name",
    ),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": ALLOWED, "ref": "x"}]},
        False,
        "plugin-unknown-field",
    ),
    case("post_workspaces", {"name": "a", "token": "mine"}, False, "unknown-field"),
    case("post_workspaces", {"name": "a\x00"}, False, "nul-name"),
    case("post_workspaces", {"name": "\x85"}, False, "blank-unicode-name"),
    case("post_workspaces", {"name": "a", "plugins": [{"source": "file://"}]}, False, "bare-file"),
    case("post_workspaces", {"name": "a", "plugins": [{"source": "file:///"}]}, False, "root-file"),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": ALLOWED + " "}]},
        False,
        "source-trailing-space",
    ),
    case(
        "post_workspaces",
        {"name": "a", "plugins": [{"source": "git+https://h/x#-ref"}]},
        False,
        "option-like-ref",
    ),
    # Replace the declared set.
    case("put_workspace_plugins", {"plugins": []}, True, "empty"),
    case("put_workspace_plugins", {"plugins": [{"source": ALLOWED}]}, True, "one"),
    case("put_workspace_plugins", {}, False, "missing"),
    case("put_workspace_plugins", {"plugins": None}, False, "null"),
    case("put_workspace_plugins", {"plugins": "x"}, False, "string"),
    case("put_workspace_plugins", {"plugins": [], "name": "x"}, False, "unknown-field"),
    # Request a reconcile (the workspace is online).
    case("post_workspace_reconcile", {}, True, "empty"),
    case("post_workspace_reconcile", {"refresh": True}, True, "refresh"),
    case("post_workspace_reconcile", {"refresh": None}, True, "refresh-null"),
    case("post_workspace_reconcile", {"refresh": "yes"}, False, "refresh-string"),
    case("post_workspace_reconcile", {"force": True}, False, "unknown-field"),
    # Fan out by plugin.
    case("post_plugins_reconcile", {"name": "seo-all"}, True, "name"),
    case("post_plugins_reconcile", {"source": "github://acme/p#main"}, True, "source"),
    case("post_plugins_reconcile", {"source": ALLOWED, "name": ""}, True, "source-empty-name"),
    case("post_plugins_reconcile", {"name": "a", "source": None}, True, "name-null-source"),
    case("post_plugins_reconcile", {}, False, "neither"),
    case("post_plugins_reconcile", {"name": ""}, False, "empty-name"),
    case("post_plugins_reconcile", {"name": "a", "source": ALLOWED}, False, "both"),
    case("post_plugins_reconcile", {"source": "svn://x/y"}, False, "scheme"),
    case("post_plugins_reconcile", {"name": 5}, False, "name-type"),
    case("post_plugins_reconcile", {"name": "x" * 65}, False, "name-long"),
    case("post_plugins_reconcile", {"plugin": "x"}, False, "unknown-field"),
    case("post_plugins_reconcile", {"source": "file://"}, False, "bare-file"),
    case("post_plugins_reconcile", {"source": "git+\x01x"}, False, "control-character"),
    case("post_plugins_reconcile", {"name": "a\x00"}, False, "nul-name"),
    case("post_plugins_reconcile", {"source": "", "name": "a"}, True, "empty-source-name"),
    # Rotation.
    case("post_token", {}, True, "empty"),
    case("post_token", {"grace_s": None}, True, "grace-null"),
    case("post_token", {"grace_s": 0}, True, "grace-zero"),
    case("post_token", {"grace_s": "1"}, False, "grace-string"),
]


@pytest.mark.parametrize(("operation_id", "fields", "valid"), REQUEST_CASES)
async def test_request_schema_accepts_what_the_handler_accepts(
    registry: Registry,
    plugin_sources: Path,
    conformance: Conformance,
    operation_id: str,
    fields: dict[str, Any],
    valid: bool,
) -> None:
    allowed = f"file://{write_tree(plugin_sources / 'p', {'p.py': ''})}"
    fields = substitute(fields, allowed)
    workspace = await registry.create_workspace()
    method, path = conformance.by_id[operation_id]
    path = path.replace("{id}", workspace.id)
    headers = ADMIN
    body = fields
    if operation_id in WORKSPACE_TOKEN_ROUTES:
        headers = workspace.auth
        body = {"workspace_id": workspace.id, **fields}
    if operation_id == "post_workspace_reconcile":
        await registry.set_status(workspace, "online")

    schema_errors = conformance.request_errors(operation_id, body)
    response = await registry.client.request(method, path, json=body, headers=headers)
    answer = await conformance.check(response, operation_id)

    assert (not schema_errors) is valid, f"schema verdict: {schema_errors}"
    assert (response.status < 400) is valid, f"server verdict: {response.status} {answer}"
    if not valid:
        assert response.status == 400
