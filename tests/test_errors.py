"""Bad input gets API.md's JSON error with the right status and changes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support import ADMIN, Registry, Workspace, bearer


async def snapshot(registry: Registry, workspace: Workspace) -> dict[str, Any]:
    row = await registry.db.fetchrow(
        "SELECT status, last_heartbeat_at, error_rate, reported_plugins_digest, "
        "(SELECT plugins FROM reported_plugins WHERE workspace_id = id) AS observed_plugins "
        "FROM workspaces WHERE id = $1",
        uuid.UUID(workspace.id),
    )
    assert row is not None
    events = await registry.db.fetchval("SELECT count(*) FROM workspace_events")
    runs = await registry.db.fetchval("SELECT count(*) FROM reconciles")
    return {**dict(row), "events": events, "reconciles": runs}


async def assert_error(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    if field is not None:
        assert error["field"] == field


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        pytest.param(b"{not json", 400, "invalid_body", None, id="malformed-json"),
        pytest.param(b'{"workspace_id": "x"', 400, "invalid_body", None, id="truncated-json"),
        pytest.param(b"[1, 2]", 400, "invalid_body", None, id="not-an-object"),
        pytest.param(b"", 400, "invalid_body", None, id="empty-body"),
        pytest.param(b'{"error_rate": NaN}', 400, "invalid_body", None, id="nan-literal"),
        pytest.param(
            {"workspace_id": None}, 400, "missing_field", "workspace_id", id="missing-workspace-id"
        ),
        pytest.param({"workspace_id": "nope"}, 400, "invalid_field", "workspace_id", id="bad-uuid"),
        pytest.param(
            {"workspace_id": 7}, 400, "invalid_field", "workspace_id", id="uuid-not-string"
        ),
        pytest.param({"error_rate": 1.5}, 400, "invalid_field", "error_rate", id="rate-above-1"),
        pytest.param({"error_rate": -0.1}, 400, "invalid_field", "error_rate", id="rate-negative"),
        pytest.param({"error_rate": "0.2"}, 400, "invalid_field", "error_rate", id="rate-string"),
        pytest.param({"error_rate": True}, 400, "invalid_field", "error_rate", id="rate-bool"),
        pytest.param(
            {"active_tasks": -1}, 400, "invalid_field", "active_tasks", id="tasks-negative"
        ),
        pytest.param({"active_tasks": 1.5}, 400, "invalid_field", "active_tasks", id="tasks-float"),
        pytest.param(
            {"active_tasks": 10**30}, 400, "invalid_field", "active_tasks", id="tasks-huge"
        ),
        pytest.param(
            {"sample_error": "x" * 5000}, 400, "invalid_field", "sample_error", id="long-string"
        ),
        pytest.param({"current_task": "a\x00b"}, 400, "invalid_field", "current_task", id="nul"),
        pytest.param({"plugins": "seo"}, 400, "invalid_field", "plugins", id="plugins-not-list"),
        pytest.param(
            {"plugins": [{"sha": "x"}]}, 400, "invalid_field", "plugins", id="plugin-name"
        ),
        pytest.param({"acks": ["not-a-uuid"]}, 400, "invalid_field", "acks", id="bad-ack"),
        pytest.param({"active_tasks": 3.5}, 400, "invalid_field", "active_tasks", id="tasks-3.5"),
    ],
)
async def test_bad_heartbeat_is_400_and_changes_nothing(
    registry: Registry,
    body: dict[str, Any] | bytes,
    status: int,
    code: str,
    field: str | None,
) -> None:
    workspace = await registry.create_workspace()
    before = await snapshot(registry, workspace)
    if isinstance(body, dict):
        payload: dict[str, Any] = {"workspace_id": workspace.id, **body}
        response = await registry.client.post(
            "/registry/heartbeat", json=payload, headers=workspace.auth
        )
    else:
        response = await registry.client.post(
            "/registry/heartbeat", data=body, headers=workspace.auth
        )

    await assert_error(response, status, code, field)
    assert await snapshot(registry, workspace) == before


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Token abc"}, id="wrong-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
        pytest.param({"Authorization": "Bearer rwt_nobody"}, id="unknown-token"),
        pytest.param(ADMIN, id="admin-token-is-no-workspace-token"),
    ],
)
async def test_heartbeat_without_a_valid_token_is_401(
    registry: Registry, headers: dict[str, str]
) -> None:
    workspace = await registry.create_workspace()
    before = await snapshot(registry, workspace)

    response = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=headers
    )

    await assert_error(response, 401, "unauthorized")
    assert await snapshot(registry, workspace) == before


async def test_heartbeat_with_another_workspaces_token_is_403(registry: Registry) -> None:
    victim = await registry.create_workspace()
    intruder = await registry.create_workspace()
    before = await snapshot(registry, victim)

    response = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": victim.id}, headers=intruder.auth
    )

    await assert_error(response, 403, "forbidden", "workspace_id")
    assert await snapshot(registry, victim) == before


async def test_heartbeat_for_unknown_workspace_id_is_403_for_a_valid_token(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": str(uuid.uuid4())}, headers=workspace.auth
    )

    await assert_error(response, 403, "forbidden")


async def test_oversize_body_is_413(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    before = await snapshot(registry, workspace)

    response = await registry.client.post(
        "/registry/heartbeat",
        data=b'{"workspace_id": "' + b"x" * (registry.settings.max_body_bytes + 1) + b'"}',
        headers=workspace.auth,
    )

    await assert_error(response, 413, "body_too_large")
    assert await snapshot(registry, workspace) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"url": "http://x", "agent_card": "card"}, "agent_card", id="card-not-object"),
        pytest.param({"url": "ftp://x"}, "url", id="url-scheme"),
        pytest.param({"url": 5}, "url", id="url-type"),
        pytest.param({"agent_card": {"a": "x\x00"}}, "agent_card", id="card-nul-value"),
        pytest.param({"agent_card": {"\x00": 1}}, "agent_card", id="card-nul-key"),
        pytest.param({"agent_card": {"a": "x" * 40_000}}, "agent_card", id="card-too-large"),
    ],
)
async def test_bad_register_is_400_and_changes_nothing(
    registry: Registry, body: dict[str, Any], field: str
) -> None:
    workspace = await registry.create_workspace()
    before = await snapshot(registry, workspace)

    response = await registry.client.post(
        "/registry/register", json={"workspace_id": workspace.id, **body}, headers=workspace.auth
    )

    await assert_error(response, 400, "invalid_field", field)
    assert await snapshot(registry, workspace) == before


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"Authorization": "Bearer wrong-admin-token-000"}, id="wrong-token"),
    ],
)
async def test_management_routes_require_the_admin_token(
    registry: Registry, headers: dict[str, str]
) -> None:
    workspace = await registry.create_workspace()

    create = await registry.client.post("/workspaces", json={"name": "x"}, headers=headers)
    show = await registry.client.get(f"/workspaces/{workspace.id}", headers=headers)
    as_runtime = await registry.client.get(f"/workspaces/{workspace.id}", headers=workspace.auth)

    for response in (create, show, as_runtime):
        await assert_error(response, 401, "unauthorized")
    assert await registry.db.fetchval("SELECT count(*) FROM workspaces") == 1


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        pytest.param({}, 400, "missing_field", "name", id="missing-name"),
        pytest.param({"name": 3}, 400, "invalid_field", "name", id="name-type"),
        pytest.param({"name": "a", "delivery": "ftp"}, 400, "invalid_field", "delivery", id="mode"),
        pytest.param({"name": "a", "plugins": {}}, 400, "invalid_field", "plugins", id="plugins"),
        pytest.param(
            {"name": "a", "plugins": [{"source": "svn://x/y"}]},
            400,
            "invalid_source",
            "plugins",
            id="unknown-scheme",
        ),
        pytest.param(
            {"name": "a", "plugins": [{"source": "git+file:///tmp/x.git#--upload-pack=evil"}]},
            400,
            "invalid_source",
            "plugins",
            id="option-like-ref",
        ),
        pytest.param(
            {"name": "a", "plugins": [{"source": "file:///etc", "name": "../x"}]},
            400,
            "invalid_plugin_name",
            "plugins",
            id="traversal-name",
        ),
        pytest.param(
            {"name": "a", "plugins": [{"source": "file:///etc"}]},
            403,
            "source_denied",
            "plugins",
            id="not-allowlisted",
        ),
        pytest.param({"name": "a", "token": "mine"}, 400, "unknown_field", "token", id="unknown"),
    ],
)
async def test_bad_workspace_creation_is_refused_and_creates_nothing(
    registry: Registry, body: dict[str, Any], status: int, code: str, field: str
) -> None:
    response = await registry.client.post("/workspaces", json=body, headers=ADMIN)

    await assert_error(response, status, code, field)
    assert await registry.db.fetchval("SELECT count(*) FROM workspaces") == 0


async def test_duplicate_plugin_names_are_refused(registry: Registry, plugin_sources: Any) -> None:
    (plugin_sources / "a").mkdir()
    (plugin_sources / "b").mkdir()
    plugins = [
        {"source": f"file://{plugin_sources}/a", "name": "same"},
        {"source": f"file://{plugin_sources}/b", "name": "same"},
    ]

    response = await registry.client.post(
        "/workspaces", json={"name": "a", "plugins": plugins}, headers=ADMIN
    )

    await assert_error(response, 400, "invalid_field", "plugins")


# A fixed id, not uuid4() at collection: pytest-xdist's workers must collect the same test ids.
@pytest.mark.parametrize(
    "path", ["/workspaces/not-a-uuid", "/workspaces/3f8e0c1a-5b7d-4e2f-9a6c-1d2b3c4e5f60"]
)
async def test_unknown_workspace_is_404(registry: Registry, path: str) -> None:
    response = await registry.client.get(path, headers=ADMIN)

    assert response.status == 404
    assert (await response.json())["error"]["code"] in ("not_found", "workspace_not_found")


async def test_unknown_route_and_method_are_json_errors(registry: Registry) -> None:
    missing = await registry.client.get("/nowhere")
    wrong_method = await registry.client.get("/registry/heartbeat")

    await assert_error(missing, 404, "not_found")
    await assert_error(wrong_method, 405, "method_not_allowed")


async def test_token_is_returned_once_and_only_its_hash_is_stored(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    shown = await registry.show(workspace)
    stored = await registry.db.fetchval(
        "SELECT token_hash FROM workspaces WHERE id = $1", uuid.UUID(workspace.id)
    )

    assert workspace.token not in str(shown)
    assert workspace.token.encode() not in stored
    assert len(stored) == 32
    assert bearer(workspace.token)["Authorization"].endswith(workspace.token)
