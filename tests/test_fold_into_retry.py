"""A new cause folded into a queued retry makes the run due now, with its full attempt budget.

A run waiting out the backoff of a failed attempt says nothing about what came since: a box
replaced while it waited, a plugin update. Each way of folding into it (a heartbeat entering
online, a manual request, a fan-out) must pull it forward and reset its attempts; otherwise
the replaced box waits up to the retry cap for its plugins, with one attempt left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import MakeRegistry
from tests.fake_runtime import FakeRuntime
from tests.support import ADMIN, Registry, Workspace, write_tree

# Long enough that a run still waiting for its retry cannot finish within a test's wait.
BACKOFF_S = 300.0


@pytest.fixture
def plugin(plugin_sources: Path) -> Path:
    return write_tree(plugin_sources / "seo-all", {"plugin.py": "print('seo')\n"})


async def waiting_retry(registry: Registry, workspace: Workspace, attempt: int = 4) -> uuid.UUID:
    """The state a run is left in when attempt `attempt` failed and a retry is scheduled."""
    reconcile_id: uuid.UUID = await registry.db.fetchval(
        "INSERT INTO reconciles (workspace_id, trigger, attempt, error, next_attempt_at) "
        "VALUES ($1, 'online_transition', $2, 'delivery_failed: the runtime answered 503', "
        "now() + make_interval(secs => $3)) RETURNING id",
        uuid.UUID(workspace.id),
        attempt,
        BACKOFF_S,
    )
    return reconcile_id


async def assert_ran_at_once_with_a_fresh_budget(
    registry: Registry, workspace: Workspace, reconcile_id: uuid.UUID
) -> None:
    runs = await registry.settled(workspace, within_s=10.0)
    assert [(r["id"], r["status"], r["attempt"]) for r in runs] == [(reconcile_id, "succeeded", 1)]


async def online_workspace(registry: Registry, plugin: Path) -> Workspace:
    workspace = await registry.create_workspace([{"source": f"file://{plugin}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    # Only the run under test from here on; the plugin stays installed, so it converges.
    await registry.db.execute("DELETE FROM reconciles")
    return workspace


async def test_entering_online_makes_a_waiting_retry_due_now(
    registry: Registry, plugin: Path
) -> None:
    workspace = await online_workspace(registry, plugin)
    await registry.set_status(workspace, "offline")
    reconcile_id = await waiting_retry(registry, workspace)

    beat = await registry.heartbeat(workspace)

    assert beat["status"] == "online"
    await assert_ran_at_once_with_a_fresh_budget(registry, workspace, reconcile_id)


async def test_a_manual_request_makes_a_waiting_retry_due_now(
    registry: Registry, plugin: Path
) -> None:
    workspace = await online_workspace(registry, plugin)
    reconcile_id = await waiting_retry(registry, workspace)

    response = await registry.client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", headers=ADMIN
    )

    assert response.status == 200, await response.text()
    assert (await response.json())["reconcile"]["id"] == str(reconcile_id)
    await assert_ran_at_once_with_a_fresh_budget(registry, workspace, reconcile_id)


async def test_a_fan_out_makes_a_waiting_retry_due_now(registry: Registry, plugin: Path) -> None:
    workspace = await online_workspace(registry, plugin)
    reconcile_id = await waiting_retry(registry, workspace)

    response = await registry.client.post(
        "/internal/plugins/reconcile", json={"source": f"file://{plugin}"}, headers=ADMIN
    )

    assert response.status == 202, await response.text()
    assert (await response.json())["queued"] == 1
    await assert_ran_at_once_with_a_fresh_budget(registry, workspace, reconcile_id)


async def test_a_declared_change_makes_a_waiting_retry_due_now(
    registry: Registry, plugin: Path
) -> None:
    workspace = await online_workspace(registry, plugin)
    reconcile_id = await waiting_retry(registry, workspace)

    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": f"file://{plugin}", "name": "seo"}]},
        headers=ADMIN,
    )

    assert response.status == 200, await response.text()
    await assert_ran_at_once_with_a_fresh_budget(registry, workspace, reconcile_id)


async def test_a_replaced_box_gets_its_plugins_at_once_after_a_failed_delivery(
    make_registry: MakeRegistry, plugin: Path, fake_runtime: FakeRuntime
) -> None:
    """The issue's story end to end: delivery to the old box failed and the retry waits out a
    long backoff; the new box's first heartbeat brings it online and the run goes at once."""
    registry = await make_registry(
        reconcile_retry_base_s=BACKOFF_S, reconcile_retry_cap_s=BACKOFF_S
    )
    fake_runtime.fail_next = 1
    workspace = await registry.create_workspace(
        [{"source": f"file://{plugin}"}], delivery="http", url=fake_runtime.url
    )
    await registry.heartbeat(workspace)
    deadline = time.monotonic() + 10.0
    while not [r for r in await registry.reconciles(workspace) if r["error"]]:
        assert time.monotonic() < deadline, await registry.reconciles(workspace)
        await asyncio.sleep(0.05)
    (waiting,) = await registry.reconciles(workspace)
    assert (waiting["status"], waiting["attempt"]) == ("queued", 1)

    await registry.set_status(workspace, "offline")
    await registry.heartbeat(workspace)

    await assert_ran_at_once_with_a_fresh_budget(registry, workspace, waiting["id"])
    assert len(fake_runtime.deliveries) == 1
