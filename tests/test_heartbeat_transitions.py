"""Heartbeat-driven transitions, one test per row of API.md's rules, with their events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.support import ADMIN, Registry, Workspace


async def status_events(registry: Registry, workspace: Workspace) -> list[tuple[Any, Any]]:
    rows = await registry.db.fetch(
        "SELECT from_status, to_status FROM workspace_events "
        "WHERE workspace_id = $1 AND kind = 'status' ORDER BY id",
        uuid.UUID(workspace.id),
    )
    return [(r["from_status"], r["to_status"]) for r in rows]


@pytest.mark.parametrize(
    ("start", "beat", "expected", "reconcile_queued"),
    [
        pytest.param("provisioning", {}, "online", True, id="provisioning-healthy-online"),
        pytest.param(
            "provisioning", {"error_rate": 0.6}, "degraded", True, id="provisioning-errors-degraded"
        ),
        pytest.param(
            "provisioning",
            {"runtime_state": "wedged"},
            "degraded",
            True,
            id="provisioning-wedged-degraded",
        ),
        pytest.param("offline", {"error_rate": 0.0}, "online", True, id="offline-online"),
        pytest.param("offline", {"error_rate": 0.9}, "degraded", True, id="offline-degraded"),
        pytest.param("failed", {}, "online", True, id="failed-online"),
        pytest.param("failed", {"runtime_state": "wedged"}, "degraded", True, id="failed-degraded"),
        pytest.param("online", {"error_rate": 0.5}, "degraded", False, id="online-at-0.5-degraded"),
        pytest.param("online", {"runtime_state": "wedged"}, "degraded", False, id="online-wedged"),
        pytest.param("online", {"error_rate": 0.3}, "online", False, id="online-in-between-stays"),
        pytest.param("degraded", {"error_rate": 0.05}, "online", False, id="degraded-recovers"),
        pytest.param(
            "degraded", {"error_rate": 0.1}, "degraded", False, id="degraded-at-0.1-stays"
        ),
        pytest.param(
            "degraded",
            {"error_rate": 0.0, "runtime_state": "wedged"},
            "degraded",
            False,
            id="degraded-wedged-stays",
        ),
        pytest.param("paused", {}, "paused", False, id="paused-never-promoted"),
        pytest.param("paused", {"error_rate": 0.9}, "paused", False, id="paused-never-degraded"),
    ],
)
async def test_heartbeat_transition(
    registry: Registry,
    start: str,
    beat: dict[str, Any],
    expected: str,
    reconcile_queued: bool,
) -> None:
    workspace = await registry.create_workspace()
    await registry.set_status(workspace, start)
    events_before = await status_events(registry, workspace)

    result = await registry.heartbeat(workspace, **beat)

    assert result["previous_status"] == start
    assert result["status"] == expected
    shown = await registry.show(workspace)
    assert shown["status"] == expected
    assert shown["heartbeat"]["last_heartbeat_at"] is not None  # recorded even when paused
    new_events = (await status_events(registry, workspace))[len(events_before) :]
    assert new_events == ([(start, expected)] if start != expected else [])
    assert bool(await registry.reconciles(workspace)) is reconcile_queued


async def test_removed_workspace_heartbeat_is_410_and_changes_nothing(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.set_status(workspace, "removed")

    response = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
    )

    assert response.status == 410
    assert (await response.json())["error"]["code"] == "workspace_removed"
    shown = await registry.show(workspace)
    assert shown["status"] == "removed"
    assert shown["heartbeat"]["last_heartbeat_at"] is None


async def test_register_records_url_and_flips_online_with_a_reconcile(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(
        "/registry/register",
        json={"workspace_id": workspace.id, "url": "http://10.0.0.7:8000", "agent_card": {"a": 1}},
        headers=workspace.auth,
    )

    assert response.status == 200
    body = await response.json()
    assert (body["previous_status"], body["status"]) == ("provisioning", "online")
    shown = await registry.show(workspace)
    assert shown["url"] == "http://10.0.0.7:8000"
    assert shown["agent_card"] == {"a": 1}
    assert len(await registry.reconciles(workspace)) == 1


async def test_heartbeat_fields_are_stored_and_shown(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    await registry.heartbeat(
        workspace,
        error_rate=0.05,
        sample_error="boom",
        active_tasks=3,
        uptime_seconds=12.5,
        current_task="crawl",
        monthly_spend=4.2,
        runtime_state="ok",
        plugins=[{"name": "seo", "sha": "abc"}],
    )

    shown = await registry.show(workspace)
    assert shown["heartbeat"] | {"last_heartbeat_at": None} == {
        "last_heartbeat_at": None,
        "error_rate": 0.05,
        "sample_error": "boom",
        "active_tasks": 3,
        "uptime_seconds": 12.5,
        "current_task": "crawl",
        "monthly_spend": 4.2,
        "runtime_state": "ok",
    }
    assert shown["observed_plugins"] == [{"name": "seo", "sha": "abc"}]


async def test_concurrent_heartbeats_report_the_flip_exactly_once(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    results = await asyncio.gather(*(registry.heartbeat(workspace) for _ in range(50)))

    previous = [r["previous_status"] for r in results]
    assert previous.count("provisioning") == 1
    assert previous.count("online") == 49
    assert await status_events(registry, workspace) == [
        (None, "provisioning"),
        ("provisioning", "online"),
    ]
    assert len(await registry.reconciles(workspace)) == 1


async def test_concurrent_heartbeats_across_workspaces_flip_each_once(registry: Registry) -> None:
    workspaces = [await registry.create_workspace() for _ in range(10)]

    results = await asyncio.gather(*(registry.heartbeat(w) for w in workspaces for _ in range(8)))

    flips = [r["workspace_id"] for r in results if r["previous_status"] == "provisioning"]
    assert sorted(flips) == sorted(w.id for w in workspaces)
    count = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE from_status = 'provisioning'"
    )
    assert count == 10


async def test_admin_sees_the_same_workspace_the_runtime_beats(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)

    response = await registry.client.get(f"/workspaces/{workspace.id}", headers=ADMIN)

    assert (await response.json())["status"] == "online"
