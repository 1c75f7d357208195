"""The runtime protocol made visible and forgiving: refusals on the workspace, token rotation
with a grace period, restarts the box did on its own, pending actions, and liveness that
follows the runtime's own interval."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from registry.keys import REFUSALS
from registry.liveness import SweepPolicy, sweep
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, Workspace, bearer, write_tree


async def _beat(registry: Registry, token: str, **body: Any) -> tuple[int, dict[str, Any]]:
    response = await registry.client.post("/registry/heartbeat", json=body, headers=bearer(token))
    return response.status, await response.json()


async def _flush_refusals(registry: Registry) -> int:
    return await registry.client.app[REFUSALS].flush(registry.db)


async def _events(registry: Registry, workspace: Workspace, kind: str) -> list[Any]:
    return await registry.db.fetch(
        "SELECT * FROM workspace_events WHERE workspace_id = $1 AND kind = $2",
        uuid.UUID(workspace.id),
        kind,
    )


# Refusals


async def test_a_refused_heartbeat_shows_on_the_workspace_and_in_why(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    for _ in range(3):
        status, _ = await _beat(
            registry, workspace.token, workspace_id=workspace.id, error_rate="high"
        )
        assert status == 400

    await _flush_refusals(registry)
    shown = await registry.show(workspace)

    refusal = shown["last_refusal"]
    assert (refusal["status"], refusal["code"], refusal["field"]) == (
        400,
        "invalid_field",
        "error_rate",
    )
    assert refusal["count"] == 3
    assert "heartbeats are refused: 400 invalid_field (error_rate)" in shown["why"]
    assert "3 times" in shown["why"]


async def test_refusals_cost_one_write_per_workspace_per_flush(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    for _ in range(20):
        await _beat(registry, workspace.token, workspace_id="not-a-uuid")

    written = await _flush_refusals(registry)

    assert written == 1
    assert (await registry.show(workspace))["last_refusal"]["count"] == 20
    assert await _flush_refusals(registry) == 0  # nothing new: no write at all


async def test_refusals_keep_counting_until_a_beat_is_accepted(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await _beat(registry, workspace.token, workspace_id=workspace.id, active_tasks=-1)
    await _flush_refusals(registry)
    await _beat(registry, workspace.token, workspace_id=workspace.id, active_tasks=-1)
    await _flush_refusals(registry)
    assert (await registry.show(workspace))["last_refusal"]["count"] == 2

    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    accepted = await registry.show(workspace)
    assert accepted["why"] is None  # online, nothing refused since the accepted beat

    await _beat(registry, workspace.token, workspace_id=workspace.id, active_tasks=-1)
    await _flush_refusals(registry)
    assert (await registry.show(workspace))["last_refusal"]["count"] == 1


async def test_a_removed_workspace_that_keeps_beating_is_visible(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    deleted = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)
    assert deleted.status == 204

    status, body = await _beat(registry, workspace.token, workspace_id=workspace.id)
    await _flush_refusals(registry)
    shown = await registry.show(workspace)

    assert (status, body["error"]["code"]) == (410, "workspace_removed")
    assert shown["last_refusal"]["status"] == 410
    assert "still heartbeats after the removal" in shown["why"]
    assert "stop its container" in shown["why"]


async def test_a_token_used_for_another_workspace_is_recorded_on_its_owner(
    registry: Registry,
) -> None:
    owner = await registry.create_workspace()
    other = await registry.create_workspace()

    status, _ = await _beat(registry, owner.token, workspace_id=other.id)
    await _flush_refusals(registry)

    assert status == 403
    assert (await registry.show(owner))["last_refusal"]["code"] == "forbidden"
    assert (await registry.show(other))["last_refusal"] is None


async def test_a_token_of_nobody_is_shown_on_the_workspace_it_names(registry: Registry) -> None:
    workspace = await registry.create_workspace()

    status, _ = await _beat(registry, "rwt_nobody", workspace_id=workspace.id)
    await _flush_refusals(registry)
    shown = await registry.show(workspace)

    assert status == 401
    assert shown["last_refusal"]["code"] == "unauthorized"
    assert "token that matches no workspace" in shown["why"]


async def test_a_token_of_nobody_naming_nobody_records_nothing(registry: Registry) -> None:
    status, _ = await _beat(registry, "rwt_nobody", workspace_id=str(uuid.uuid4()))

    assert status == 401
    assert await _flush_refusals(registry) == 0


async def test_refusals_are_logged_once_a_minute_per_workspace(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = await registry.create_workspace()
    caplog.set_level(logging.WARNING, logger="registry.refusals")

    for _ in range(3):
        await _beat(registry, workspace.token, workspace_id=workspace.id, error_rate=2)
        await _flush_refusals(registry)

    lines = [r.getMessage() for r in caplog.records if r.name == "registry.refusals"]
    assert len(lines) == 1
    assert workspace.id in lines[0]
    assert "400 invalid_field" in lines[0]


# Token rotation


async def _rotate(registry: Registry, workspace: Workspace, **body: Any) -> dict[str, Any]:
    response = await registry.client.post(
        f"/workspaces/{workspace.id}/token", json=body or None, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def test_rotation_keeps_the_previous_token_working_for_the_grace_period(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    rotated = await _rotate(registry, workspace)

    old_status, old_answer = await _beat(registry, workspace.token, workspace_id=workspace.id)
    shown = await registry.show(workspace)
    new_answer = await registry.heartbeat(Workspace(workspace.id, rotated["token"]))

    assert (old_status, old_answer["status"], old_answer["token_rotated"]) == (
        200,
        "online",
        True,
    )
    assert new_answer["token_rotated"] is False
    assert rotated["previous_token_valid_until"] is not None
    assert shown["token"]["previous_used_at"] is not None
    assert "still uses the previous token" in shown["why"]
    events = await _events(registry, workspace, "token")
    assert [e["cause"] for e in events] == ["token_rotated"]


async def test_after_the_grace_period_the_previous_token_gets_token_rotated(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    await _rotate(registry, workspace)
    # The grace period is over (time moved by the database, not by sleeping).
    await registry.db.execute(
        "UPDATE workspaces SET previous_token_valid_until = now() - interval '1 second' "
        "WHERE id = $1",
        uuid.UUID(workspace.id),
    )

    status, body = await _beat(registry, workspace.token, workspace_id=workspace.id)
    await _flush_refusals(registry)
    shown = await registry.show(workspace)

    assert (status, body["error"]["code"]) == (401, "token_rotated")
    assert shown["last_refusal"]["code"] == "token_rotated"
    assert "uses a rotated token" in shown["why"]


async def test_a_zero_grace_setting_invalidates_at_once(make_registry: MakeRegistry) -> None:
    registry = await make_registry(token_rotation_grace_s=0.0)
    workspace = await registry.create_workspace()
    await _rotate(registry, workspace)

    status, body = await _beat(registry, workspace.token, workspace_id=workspace.id)

    assert (status, body["error"]["code"]) == (401, "token_rotated")


async def test_a_second_rotation_forgets_the_oldest_token(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    second = await _rotate(registry, workspace)
    await _rotate(registry, workspace)

    oldest, oldest_body = await _beat(registry, workspace.token, workspace_id=workspace.id)
    previous, _ = await _beat(registry, second["token"], workspace_id=workspace.id)

    assert (oldest, oldest_body["error"]["code"]) == (401, "unauthorized")
    assert previous == 200


@pytest.mark.parametrize("body", [{"grace": 1}, {"grace_s": -1}, {"grace_s": "1"}])
async def test_rotation_refuses_a_bad_body_and_keeps_the_token(
    registry: Registry, body: dict[str, Any]
) -> None:
    workspace = await registry.create_workspace()

    response = await registry.client.post(
        f"/workspaces/{workspace.id}/token", json=body, headers=ADMIN
    )

    assert response.status == 400
    assert (await registry.show(workspace))["token"]["rotated_at"] is None
    await registry.heartbeat(workspace)


# Restarts and pending actions


def _source(plugin_sources: Path, name: str) -> str:
    return f"file://{write_tree(plugin_sources / name, {'plugin.py': f'print({name!r})'})}"


async def _online_with_restart_pending(registry: Registry, plugin_sources: Path) -> Workspace:
    workspace = await registry.create_workspace([{"source": _source(plugin_sources, "p")}])
    await registry.heartbeat(workspace, uptime_seconds=100.0)
    await registry.settled(workspace)
    return workspace


async def test_a_pending_restart_keeps_the_workspace_out_of_sync_and_says_so(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_restart_pending(registry, plugin_sources)

    before = await registry.show(workspace)
    actions = (await registry.heartbeat(workspace, uptime_seconds=101.0))["actions"]
    handed_out = await registry.show(workspace)
    await registry.heartbeat(workspace, uptime_seconds=102.0, acks=[actions[0]["id"]])
    after = await registry.show(workspace)

    assert before["plugins_sync"] == "out_of_sync"
    [pending] = before["pending_actions"]
    assert pending["type"] == "restart" and pending["delivered_at"] is None
    assert pending["age_s"] >= 0
    assert "waiting for the runtime to restart" in before["why"]
    assert "not yet handed out" in before["why"]
    assert handed_out["pending_actions"][0]["delivered_at"] is not None
    assert "not acknowledged" in handed_out["why"]
    assert (after["plugins_sync"], after["pending_actions"], after["why"]) == ("synced", [], None)


async def test_an_uptime_drop_acknowledges_restarts_asked_before_it(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_restart_pending(registry, plugin_sources)
    assert (await registry.heartbeat(workspace, uptime_seconds=101.0))["actions"]

    # The box restarted on its own just now (after the restart was asked): it never acks,
    # but the restart happened.
    answer = await registry.heartbeat(workspace, uptime_seconds=0.0)
    shown = await registry.show(workspace)

    assert answer["actions"] == []
    assert shown["pending_actions"] == []
    assert shown["plugins_sync"] == "synced"
    [event] = await _events(registry, workspace, "runtime")
    assert event["cause"] == "runtime_restarted"


async def test_a_restart_asked_after_the_box_restarted_stays_pending(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_restart_pending(registry, plugin_sources)

    answer = await registry.heartbeat(workspace, uptime_seconds=101.0)
    # Uptime went down, but the box restarted a minute ago: before the restart was asked.
    lower = await registry.heartbeat(workspace, uptime_seconds=60.0)

    assert len(answer["actions"]) == 1
    assert [a["id"] for a in lower["actions"]] == [answer["actions"][0]["id"]]
    assert len(await _events(registry, workspace, "runtime")) == 1


async def test_a_beat_without_uptime_is_not_a_restart(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_restart_pending(registry, plugin_sources)

    answer = await registry.heartbeat(workspace)
    shown = await registry.show(workspace)

    assert len(answer["actions"]) == 1
    assert shown["heartbeat"]["uptime_seconds"] == 100.0
    assert await _events(registry, workspace, "runtime") == []


# Liveness that follows the runtime's own interval


async def _previous_beat_ago(registry: Registry, workspace: Workspace, seconds: float) -> None:
    """Move the last beat into the past: time passes in the database, not by sleeping."""
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - make_interval(secs => $2) WHERE id = $1",
        uuid.UUID(workspace.id),
        seconds,
    )


async def _status(registry: Registry, workspace: Workspace) -> str:
    status: str = await registry.db.fetchval(
        "SELECT status FROM workspaces WHERE id = $1", uuid.UUID(workspace.id)
    )
    return status


async def _runtime_on_a_30s_interval(registry: Registry) -> Workspace:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    for _ in range(3):
        await _previous_beat_ago(registry, workspace, 30.0)
        await registry.heartbeat(workspace)
    return workspace


async def test_a_30s_runtime_does_not_flap_against_a_5s_registry(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(offline_after_s=5.0, heartbeat_interval_s=2.0)
    policy = SweepPolicy.from_settings(registry.settings)
    workspace = await _runtime_on_a_30s_interval(registry)

    shown = await registry.show(workspace)
    # 20 s of silence: long past the registry's 5 s, well within the runtime's own interval.
    await _previous_beat_ago(registry, workspace, 20.0)
    await sweep(registry.db, policy)
    within_its_interval = await _status(registry, workspace)
    # Three of its intervals without a beat: it is gone.
    await _previous_beat_ago(registry, workspace, 100.0)
    await sweep(registry.db, policy)

    assert shown["liveness"]["observed_interval_s"] == pytest.approx(30.0, abs=1.0)
    assert shown["liveness"]["offline_after_s"] == pytest.approx(90.0, abs=3.0)
    assert within_its_interval == "online"
    assert await _status(registry, workspace) == "offline"


async def test_the_stretched_window_is_capped(make_registry: MakeRegistry) -> None:
    registry = await make_registry(offline_after_s=5.0, offline_after_max_s=40.0)
    policy = SweepPolicy.from_settings(registry.settings)
    workspace = await _runtime_on_a_30s_interval(registry)

    await _previous_beat_ago(registry, workspace, 45.0)
    await sweep(registry.db, policy)

    assert (await registry.show(workspace))["liveness"]["offline_after_s"] == 40.0
    assert await _status(registry, workspace) == "offline"


async def test_a_gap_across_an_outage_is_not_taken_for_the_interval(
    make_registry: MakeRegistry,
) -> None:
    registry = await make_registry(offline_after_s=5.0, offline_after_max_s=60.0)
    workspace = await _runtime_on_a_30s_interval(registry)

    # The registry was down for ten minutes; the workspace was never swept meanwhile.
    await _previous_beat_ago(registry, workspace, 600.0)
    await registry.heartbeat(workspace)

    shown = await registry.show(workspace)
    assert shown["liveness"]["observed_interval_s"] == pytest.approx(30.0, abs=1.0)


# A box replaced while online


async def _converged(registry: Registry, plugin_sources: Path) -> Workspace:
    """Online, its plugin installed, the restart handed out and acknowledged."""
    workspace = await _online_with_restart_pending(registry, plugin_sources)
    [restart] = (await registry.heartbeat(workspace, uptime_seconds=101.0))["actions"]
    installed = (await registry.show(workspace))["installed_plugins"]
    await registry.heartbeat(
        workspace,
        uptime_seconds=102.0,
        acks=[restart["id"]],
        plugins=[{"name": p["name"], "sha": p["sha"]} for p in installed],
    )
    return workspace


async def _restart_handed_out_ago(registry: Registry, workspace: Workspace, seconds: float) -> None:
    await registry.db.execute(
        "UPDATE workspace_actions SET delivered_at = now() - make_interval(secs => $2) "
        "WHERE workspace_id = $1",
        uuid.UUID(workspace.id),
        seconds,
    )


async def test_a_new_box_that_never_went_offline_gets_its_plugins_back(
    make_registry: MakeRegistry, plugin_sources: Path
) -> None:
    registry = await make_registry(restart_reconcile_every_s=0.01)
    workspace = await _converged(registry, plugin_sources)

    # A new box at the same workspace: uptime from 1, nothing installed, still `online`.
    answer = await registry.heartbeat(workspace, uptime_seconds=1.0, plugins=[])
    runs = await registry.settled(workspace)
    steps = await registry.db.fetch(
        "SELECT plugin, action FROM reconcile_steps WHERE reconcile_id = $1", runs[-1]["id"]
    )

    assert answer["previous_status"] == "online"
    assert [r["trigger"] for r in runs] == ["online_transition", "runtime_restarted"]
    assert [(s["plugin"], s["action"]) for s in steps] == [("p", "install")]


async def test_registering_again_while_online_queues_a_reconcile(
    make_registry: MakeRegistry, plugin_sources: Path
) -> None:
    registry = await make_registry(restart_reconcile_every_s=0.01)
    workspace = await _converged(registry, plugin_sources)
    # Handed out a while ago (by the database's clock, not the test's speed): it does not
    # explain this register.
    await _restart_handed_out_ago(registry, workspace, 60.0)

    response = await registry.client.post(
        "/registry/register", json={"workspace_id": workspace.id}, headers=workspace.auth
    )
    runs = await registry.settled(workspace)

    assert response.status == 200
    assert [r["trigger"] for r in runs] == ["online_transition", "runtime_restarted"]


async def test_restart_reconciles_are_due_at_most_once_a_window(
    make_registry: MakeRegistry, plugin_sources: Path
) -> None:
    registry = await make_registry(restart_reconcile_every_s=3600.0)
    workspace = await _converged(registry, plugin_sources)
    await _restart_handed_out_ago(registry, workspace, 7200.0)

    # The box restarts again and again right after its last run: one run, due an hour after
    # that run, however often it restarts meanwhile.
    for uptime in (1.0, 0.5, 0.2):
        await registry.heartbeat(workspace, uptime_seconds=uptime)
    queued = await registry.db.fetch(
        "SELECT trigger, next_attempt_at - now() AS due_in FROM reconciles "
        "WHERE workspace_id = $1 AND status = 'queued'",
        uuid.UUID(workspace.id),
    )

    assert [r["trigger"] for r in queued] == ["runtime_restarted"]
    assert queued[0]["due_in"].total_seconds() > 3000
    assert (
        "reconcile (runtime_restarted) is queued, due at" in (await registry.show(workspace))["why"]
    )


async def test_the_restart_it_was_asked_for_queues_no_reconcile(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_restart_pending(registry, plugin_sources)
    [restart] = (await registry.heartbeat(workspace, uptime_seconds=101.0))["actions"]

    # It restarts as asked (uptime down) and registers again at boot.
    await registry.heartbeat(workspace, uptime_seconds=0.0)
    await registry.client.post(
        "/registry/register", json={"workspace_id": workspace.id}, headers=workspace.auth
    )
    runs = await registry.settled(workspace)
    shown = await registry.show(workspace)

    assert [r["trigger"] for r in runs] == ["online_transition"]
    assert (shown["plugins_sync"], shown["pending_actions"]) == ("synced", [])
    assert restart["type"] == "restart"
