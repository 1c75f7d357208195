"""A box replaced without going offline gets its plugins back (issue 13, item 6).

The probe: a new box answers at the same URL, the workspace never leaves `online`, the box
reports `plugins: []`. Heartbeats catch the visible cases (an uptime reset with no restart
pending, a register from another instance id); the drift check (registry/drift.py) catches the
rest once the report has stood still. Real git sources, a real HTTP runtime (tests/
fake_runtime.py); time moves by setting timestamps in the database, never by sleeping.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from registry.db.drift import queue_drifted
from registry.keys import RECONCILER
from tests.conftest import MakeRegistry
from tests.fake_runtime import FakeRuntime
from tests.support import Registry, Workspace, make_git_repo

# Long enough that the background check never runs during a test (it checks once per settle
# time): these tests run the check themselves, after moving time.
SETTLE_S = 3600.0
EVERY_S = 7200.0


async def _replaced_box_setup(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime, **settings: Any
) -> tuple[Registry, Workspace, str]:
    """Online over http delivery, its git plugin installed on the box, the restart handed out
    and acknowledged, and the box reporting the plugin: converged."""
    registry = await make_registry(
        **{"drift_settle_s": SETTLE_S, "drift_reconcile_every_s": EVERY_S, **settings}
    )
    make_git_repo(plugin_sources / "tool", {"tool.py": "print('tool')"})
    workspace = await registry.create_workspace(
        [{"source": f"git+file://{plugin_sources}/tool", "name": "tool"}],
        delivery="http",
        url=fake_runtime.url,
    )
    await registry.heartbeat(workspace, uptime_seconds=100.0)
    await registry.settled(workspace)
    [restart] = (await registry.heartbeat(workspace, uptime_seconds=101.0))["actions"]
    [installed] = (await registry.show(workspace))["installed_plugins"]
    await registry.heartbeat(
        workspace,
        uptime_seconds=102.0,
        acks=[restart["id"]],
        plugins=[{"name": "tool", "sha": installed["sha"]}],
    )
    assert (await registry.show(workspace))["plugins_sync"] == "synced"
    assert fake_runtime.installed() == {"tool"}
    return registry, workspace, installed["sha"]


def _new_box(fake_runtime: FakeRuntime) -> None:
    """Another box behind the same URL: nothing installed on it."""
    fake_runtime._history.clear()
    fake_runtime.deliveries.clear()


async def _time_passes(registry: Registry, workspace: Workspace, seconds: float) -> None:
    """Everything recorded about the workspace happened `seconds` earlier."""
    wid = uuid.UUID(workspace.id)
    shift = "- make_interval(secs => $2)"
    for sql in (
        f"UPDATE reported_plugins SET changed_at = changed_at {shift} WHERE workspace_id = $1",
        f"UPDATE installed_plugins SET installed_at = installed_at {shift} WHERE workspace_id = $1",
        f"UPDATE reconciles SET created_at = created_at {shift}, "
        f"finished_at = finished_at {shift} WHERE workspace_id = $1",
        f"UPDATE workspace_actions SET created_at = created_at {shift}, "
        f"delivered_at = delivered_at {shift}, acked_at = acked_at {shift} "
        "WHERE workspace_id = $1",
    ):
        await registry.db.execute(sql, wid, seconds)


async def _check(registry: Registry) -> list[uuid.UUID]:
    queued = await queue_drifted(registry.db, settle_s=SETTLE_S, every_s=EVERY_S, limit=500)
    registry.client.app[RECONCILER].wake()
    return queued


async def _triggers(registry: Registry, workspace: Workspace) -> list[str]:
    return [r["trigger"] for r in await registry.reconciles(workspace)]


async def test_a_replaced_box_reporting_no_plugins_gets_them_back_after_the_settle_time(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    registry, workspace, sha = await _replaced_box_setup(
        make_registry, plugin_sources, fake_runtime
    )
    _new_box(fake_runtime)
    # Its uptime says nothing (not reported): only its report of its plugins tells.
    answer = await registry.heartbeat(workspace, plugins=[])
    shown_at_once = await registry.show(workspace)
    not_settled = await _check(registry)

    await _time_passes(registry, workspace, SETTLE_S + 60)
    queued = await _check(registry)
    shown_queued = await registry.show(workspace)
    runs = await registry.settled(workspace)

    assert answer["previous_status"] == "online"
    assert "its runtime does not report installed plugins: tool" in shown_at_once["why"]
    assert not_settled == []
    assert queued == [uuid.UUID(workspace.id)]
    assert "plugin reconcile (drift_detected) in progress" in shown_queued["why"]
    assert [r["trigger"] for r in runs] == ["online_transition", "drift_detected"]
    assert runs[-1]["status"] == "succeeded"
    assert [(d.name, d.sha) for d in fake_runtime.deliveries] == [("tool", sha)]
    history = await registry.client.get(
        f"/internal/workspaces/{workspace.id}/reconciles",
        headers={"Authorization": f"Bearer {registry.settings.admin_token}"},
    )
    assert (await history.json())["reconciles"][0]["trigger"] == "drift_detected"


async def test_no_drift_while_the_report_matches_the_records(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    registry, workspace, _ = await _replaced_box_setup(make_registry, plugin_sources, fake_runtime)

    await _time_passes(registry, workspace, SETTLE_S + 60)

    assert await _check(registry) == []


async def test_no_drift_while_a_restart_is_pending(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    registry, workspace, _ = await _replaced_box_setup(make_registry, plugin_sources, fake_runtime)
    await registry.heartbeat(workspace, plugins=[])
    # Asked to restart (it has not loaded what it was given yet): its report is expected to
    # lack the plugin until then.
    await registry.db.execute(
        "INSERT INTO workspace_actions (workspace_id, type, reason) VALUES ($1, 'restart', 'x')",
        uuid.UUID(workspace.id),
    )
    await _time_passes(registry, workspace, SETTLE_S + 60)

    assert await _check(registry) == []


async def test_drift_reconciles_are_rate_limited_per_workspace(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    registry, workspace, _ = await _replaced_box_setup(make_registry, plugin_sources, fake_runtime)
    await registry.heartbeat(workspace, plugins=[])
    await _time_passes(registry, workspace, SETTLE_S + 60)
    assert await _check(registry) == [uuid.UUID(workspace.id)]
    await registry.settled(workspace)
    # It restarts as asked, yet keeps reporting without the plugin (its runtime cannot load
    # it, say).
    [restart] = (await registry.heartbeat(workspace))["actions"]
    await registry.heartbeat(workspace, acks=[restart["id"]], plugins=[{"name": "x", "sha": "y"}])

    await _time_passes(registry, workspace, SETTLE_S + 60)  # settled, but within EVERY_S
    within_the_window = await _check(registry)
    await _time_passes(registry, workspace, EVERY_S)
    after_it = await _check(registry)

    assert within_the_window == []
    assert after_it == [uuid.UUID(workspace.id)]
    assert await _triggers(registry, workspace) == [
        "online_transition",
        "drift_detected",
        "drift_detected",
    ]


async def test_an_uptime_reset_with_no_restart_pending_queues_a_reconcile(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    # Its restart was handed out and acknowledged a moment ago: that does not explain a
    # later drop of its uptime.
    registry, workspace, sha = await _replaced_box_setup(
        make_registry, plugin_sources, fake_runtime, restart_reconcile_every_s=0.01
    )
    _new_box(fake_runtime)

    await registry.heartbeat(workspace, uptime_seconds=1.0, plugins=[])
    runs = await registry.settled(workspace)

    assert [r["trigger"] for r in runs] == ["online_transition", "runtime_restarted"]
    assert [(d.name, d.sha) for d in fake_runtime.deliveries] == [("tool", sha)]


async def test_a_register_from_another_instance_queues_a_reconcile_despite_a_fresh_restart(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    # The window in which a handed-out restart explains a register: an hour, far longer than
    # any test takes.
    registry, workspace, _ = await _replaced_box_setup(
        make_registry, plugin_sources, fake_runtime, restart_reconcile_every_s=3600.0
    )

    async def register(instance_id: str) -> list[str]:
        response = await registry.client.post(
            "/registry/register",
            json={"workspace_id": workspace.id, "instance_id": instance_id},
            headers=workspace.auth,
        )
        assert response.status == 200, await response.text()
        return await _triggers(registry, workspace)

    # A restart handed out within the window explains a register (it is the box coming
    # back), from the box it knows or from the first that says who it is...
    first = await register("box-1")
    same_box = await register("box-1")
    # ...but not one from another box.
    other_box = await register("box-2")

    assert first == same_box == ["online_transition"]
    assert other_box == ["online_transition", "runtime_restarted"]


async def test_the_background_check_queues_the_drift_reconcile(
    make_registry: MakeRegistry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    # A settle time of 1 s: the loop checks every second. Time is still moved in the
    # database; the deadline only bounds the wait for the loop's next turn.
    registry, workspace, _ = await _replaced_box_setup(
        make_registry, plugin_sources, fake_runtime, drift_settle_s=1.0
    )
    _new_box(fake_runtime)
    await registry.heartbeat(workspace, plugins=[])
    await _time_passes(registry, workspace, 60.0)

    deadline = time.monotonic() + 20.0
    while "drift_detected" not in await _triggers(registry, workspace):
        assert time.monotonic() < deadline, "the drift check never queued a reconcile"
        await asyncio.sleep(0.1)
    await registry.settled(workspace)

    assert fake_runtime.installed() == {"tool"}
