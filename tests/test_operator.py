"""Operator actions: pause, resume, remove, token rotation, and listing the fleet."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support import ADMIN, Registry, Workspace, write_tree


async def act(registry: Registry, workspace: Workspace, action: str) -> int:
    response = await registry.client.post(f"/workspaces/{workspace.id}/{action}", headers=ADMIN)
    return response.status


async def last_event(registry: Registry, workspace: Workspace) -> tuple[str, str, str, str]:
    row = await registry.db.fetchrow(
        "SELECT from_status, to_status, cause, actor FROM workspace_events "
        "WHERE workspace_id = $1 AND kind = 'status' ORDER BY id DESC LIMIT 1",
        uuid.UUID(workspace.id),
    )
    assert row is not None
    return row["from_status"], row["to_status"], row["cause"], row["actor"]


async def test_paused_workspace_records_heartbeats_but_is_never_promoted(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)

    assert await act(registry, workspace, "pause") == 200
    beat = await registry.heartbeat(workspace, error_rate=0.02, active_tasks=4)

    assert (beat["previous_status"], beat["status"]) == ("paused", "paused")
    shown = await registry.show(workspace)
    assert shown["status"] == "paused"
    assert shown["heartbeat"]["active_tasks"] == 4
    assert "paused by an operator" in shown["why"]
    assert await last_event(registry, workspace) == ("online", "paused", "paused", "admin")


async def test_resume_releases_the_hold_and_the_next_heartbeat_promotes(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    await act(registry, workspace, "pause")

    status = await act(registry, workspace, "resume")
    beat = await registry.heartbeat(workspace)

    assert status == 200
    assert (beat["previous_status"], beat["status"]) == ("offline", "online")
    assert len(await registry.reconciles(workspace)) == 2  # the box may have changed


async def test_resume_of_a_workspace_that_is_not_paused_is_409(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(f"/workspaces/{workspace.id}/resume", headers=ADMIN)

    assert response.status == 409
    assert (await response.json())["error"]["code"] == "not_paused"
    assert (await registry.show(workspace))["status"] == "provisioning"


async def test_pausing_twice_is_idempotent(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    first = await act(registry, workspace, "pause")
    second = await act(registry, workspace, "pause")

    assert (first, second) == (200, 200)
    events = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE to_status = 'paused'"
    )
    assert events == 1


async def test_delete_tombstones_the_workspace_and_its_runtime_gets_410(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)

    deleted = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)
    beat = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
    )
    pause = await act(registry, workspace, "pause")

    assert deleted.status == 204
    assert beat.status == 410
    assert pause == 409
    assert (await registry.show(workspace))["status"] == "removed"
    assert await last_event(registry, workspace) == ("online", "removed", "removed", "admin")


async def test_delete_ends_a_queued_reconcile(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.set_status(workspace, "online")
    await registry.db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'manual', now() + interval '1 hour')",
        uuid.UUID(workspace.id),
    )

    await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)

    runs = await registry.reconciles(workspace)
    assert [(r["status"], r["error"]) for r in runs] == [("failed", "workspace was removed")]


async def test_token_rotation_with_no_grace_invalidates_the_old_token_at_once(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(
        f"/workspaces/{workspace.id}/token", json={"grace_s": 0}, headers=ADMIN
    )
    new_token = (await response.json())["token"]
    old = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
    )
    new = await registry.heartbeat(Workspace(workspace.id, new_token))

    assert response.status == 200
    assert new_token != workspace.token
    assert old.status == 401
    assert (await old.json())["error"]["code"] == "token_rotated"
    assert new["status"] == "online"


@pytest.mark.parametrize("action", ["pause", "resume", "token"])
async def test_actions_on_an_unknown_workspace_are_404(registry: Registry, action: str) -> None:
    response = await registry.client.post(f"/workspaces/{uuid.uuid4()}/{action}", headers=ADMIN)

    assert response.status == 404


async def test_listing_pages_through_the_fleet_by_status(registry: Registry) -> None:
    workspaces = [await registry.create_workspace() for _ in range(7)]
    for workspace in workspaces[:5]:
        await registry.heartbeat(workspace)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "status=online&limit=2" + (f"&cursor={cursor}" if cursor else "")
        response = await registry.client.get(f"/workspaces?{query}", headers=ADMIN)
        body = await response.json()
        seen += [w["id"] for w in body["workspaces"]]
        assert all(w["status"] == "online" for w in body["workspaces"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert sorted(seen) == sorted(w.id for w in workspaces[:5])
    assert len(seen) == len(set(seen))
    assert pages == 3


@pytest.mark.parametrize(
    "query", ["status=sleeping", "limit=0", "limit=1000", "limit=x", "cursor=not-a-uuid"]
)
async def test_bad_list_query_is_400(registry: Registry, query: str) -> None:
    response = await registry.client.get(f"/workspaces?{query}", headers=ADMIN)

    assert response.status == 400


async def test_listing_returns_workspaces_oldest_first(registry: Registry) -> None:
    created = [await registry.create_workspace() for _ in range(5)]

    response = await registry.client.get("/workspaces", headers=ADMIN)

    assert [w["id"] for w in (await response.json())["workspaces"]] == [w.id for w in created]


def test_uuid7_ids_are_valid_version_7_and_ordered() -> None:
    from registry.ids import uuid7

    ids = [uuid7() for _ in range(1000)]

    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert [i.bytes[:6] for i in ids] == sorted(i.bytes[:6] for i in ids)


async def test_delete_removes_the_workspaces_plugins_directory_once_the_tombstone_committed(
    registry: Registry, plugin_sources: Path
) -> None:
    source = write_tree(plugin_sources / "hello", {"main.py": "print('hello')\n"})
    workspace = await registry.create_workspace(plugins=[{"source": f"file://{source}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    installed = registry.settings.resolved_plugins_dir / workspace.id
    assert (installed / "hello" / "main.py").is_file()

    response = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)

    assert response.status == 204
    assert not installed.exists()
    assert list(registry.settings.resolved_plugins_dir.iterdir()) == []
    assert source.is_dir(), "the source is not the install"


async def test_delete_of_a_workspace_whose_plugins_directory_is_a_symlink_removes_only_the_link(
    registry: Registry, tmp_path: Path
) -> None:
    workspace = await registry.create_workspace()
    elsewhere = write_tree(tmp_path / "elsewhere", {"keep.txt": "not the registry's\n"})
    plugins_dir = registry.settings.resolved_plugins_dir
    plugins_dir.mkdir(parents=True, exist_ok=True)
    (plugins_dir / workspace.id).symlink_to(elsewhere)

    response = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)

    assert response.status == 204
    assert not (plugins_dir / workspace.id).is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "not the registry's\n"


async def test_a_delete_that_is_refused_leaves_the_plugins_directory_alone(
    registry: Registry, tmp_path: Path
) -> None:
    plugins_dir = registry.settings.resolved_plugins_dir
    unknown = uuid.uuid4()
    write_tree(plugins_dir / str(unknown), {"kept/main.py": "x\n"})

    response = await registry.client.delete(f"/workspaces/{unknown}", headers=ADMIN)

    assert response.status == 404
    assert (plugins_dir / str(unknown) / "kept" / "main.py").is_file()
