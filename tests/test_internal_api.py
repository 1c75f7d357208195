"""The internal reconcile API: manual and fan-out requests, and reading runs back."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.support import ADMIN, Registry, Workspace, git, make_git_repo


async def request_reconcile(
    registry: Registry, workspace: Workspace, **body: Any
) -> tuple[int, dict[str, Any]]:
    response = await registry.client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", json=body, headers=ADMIN
    )
    return response.status, await response.json()


async def online_git_workspace(registry: Registry, plugin_sources: Path) -> tuple[Workspace, Path]:
    repo = plugin_sources / "tool"
    make_git_repo(repo, {"tool.py": "v1"})
    workspace = await registry.create_workspace([{"source": f"git+file://{repo}#main"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    return workspace, repo


async def move_branch(repo: Path) -> str:
    (repo / "tool.py").write_text("v2")
    git(repo, "commit", "-qam", "v2")
    return git(repo, "rev-parse", "HEAD")


async def test_manual_reconcile_of_a_converged_workspace_is_a_no_op(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace, _ = await online_git_workspace(registry, plugin_sources)

    status, body = await request_reconcile(registry, workspace)
    runs = await registry.settled(workspace)

    assert status == 202
    assert body["reconcile"]["trigger"] == "manual"
    assert body["reconcile"]["status"] in ("queued", "running", "succeeded")
    assert runs[-1]["id"] == uuid.UUID(body["reconcile"]["id"])
    assert runs[-1]["status"] == "succeeded"
    assert runs[-1]["restart_requested"] is False


async def test_refresh_reinstalls_a_plugin_whose_branch_moved(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace, repo = await online_git_workspace(registry, plugin_sources)
    new_sha = await move_branch(repo)

    await request_reconcile(registry, workspace, refresh=False)
    await registry.settled(workspace)
    unchanged = (await registry.show(workspace))["installed_plugins"][0]["sha"]
    await request_reconcile(registry, workspace, refresh=True)
    runs = await registry.settled(workspace)

    assert unchanged != new_sha
    shown = await registry.show(workspace)
    assert shown["installed_plugins"][0]["sha"] == new_sha
    installed = registry.settings.resolved_plugins_dir / workspace.id / "tool" / "tool.py"
    assert installed.read_text() == "v2"
    assert runs[-1]["refresh"] is True
    assert shown["last_reconcile"]["steps"][0]["action"] == "upgrade"


async def test_manual_reconcile_needs_a_live_workspace(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    status, body = await request_reconcile(registry, workspace)

    assert status == 409
    assert body["error"]["code"] == "workspace_not_live"
    assert await registry.reconciles(workspace) == []


async def test_manual_reconcile_of_unknown_workspace_is_404(registry: Registry) -> None:
    status, body = await request_reconcile(registry, Workspace(str(uuid.uuid4()), "x"))

    assert status == 404
    assert body["error"]["code"] == "workspace_not_found"


async def test_manual_reconcile_rejects_a_non_boolean_refresh(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.set_status(workspace, "online")

    status, body = await request_reconcile(registry, workspace, refresh="yes")

    assert status == 400
    assert body["error"]["field"] == "refresh"


async def test_fan_out_by_source_and_by_name_refreshes_live_declarers(
    registry: Registry, plugin_sources: Path
) -> None:
    live, repo = await online_git_workspace(registry, plugin_sources)
    offline = await registry.create_workspace([{"source": f"git+file://{repo}#main"}])
    await registry.set_status(offline, "offline")
    new_sha = await move_branch(repo)

    by_source = await registry.client.post(
        "/internal/plugins/reconcile", json={"source": f"git+file://{repo}#main"}, headers=ADMIN
    )
    runs = await registry.settled(live)
    by_name = await registry.client.post(
        "/internal/plugins/reconcile", json={"name": "tool"}, headers=ADMIN
    )
    nobody = await registry.client.post(
        "/internal/plugins/reconcile", json={"name": "unknown"}, headers=ADMIN
    )

    assert (by_source.status, await by_source.json()) == (202, {"queued": 1})
    assert (by_name.status, await by_name.json()) == (202, {"queued": 1})
    assert (nobody.status, await nobody.json()) == (202, {"queued": 0})
    assert runs[-1]["trigger"] == "plugin_updated"
    assert (await registry.show(live))["installed_plugins"][0]["sha"] == new_sha
    assert await registry.reconciles(offline) == []


async def test_fan_out_needs_exactly_one_of_source_and_name(registry: Registry) -> None:
    both = await registry.client.post(
        "/internal/plugins/reconcile", json={"source": "file:///x", "name": "x"}, headers=ADMIN
    )
    neither = await registry.client.post("/internal/plugins/reconcile", json={}, headers=ADMIN)

    assert both.status == neither.status == 400


async def test_reconciles_can_be_read_back(registry: Registry, plugin_sources: Path) -> None:
    workspace, _ = await online_git_workspace(registry, plugin_sources)
    run_id = (await registry.reconciles(workspace))[0]["id"]

    one = await registry.client.get(f"/internal/reconciles/{run_id}", headers=ADMIN)
    listed = await registry.client.get(
        f"/internal/workspaces/{workspace.id}/reconciles?limit=5", headers=ADMIN
    )
    missing = await registry.client.get(f"/internal/reconciles/{uuid.uuid4()}", headers=ADMIN)
    bad_limit = await registry.client.get(
        f"/internal/workspaces/{workspace.id}/reconciles?limit=0", headers=ADMIN
    )

    body = await one.json()
    assert body["id"] == str(run_id)
    assert body["status"] == "succeeded"
    assert body["steps"][0]["plugin"] == "tool"
    assert [r["id"] for r in (await listed.json())["reconciles"]] == [str(run_id)]
    assert missing.status == 404
    assert bad_limit.status == 400


async def test_internal_api_requires_the_admin_token(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", json={}, headers=workspace.auth
    )

    assert response.status == 401
