"""Derived state told truthfully: plugins_sync, why, ready and usable, from one function.

A property test over generated recorded states (pure: no database), then the findings of
issue 12 end to end: a silent workspace held online by the mass-expiry guard, a declared and
installed plugin whose source the allowlist refuses since it was tightened, and the offline
reason right after a resume.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.db.actions import PendingAction
from registry.db.fleet import Guard
from registry.db.reconciles import Reconcile
from registry.db.workspaces import DeclaredPlugin, InstalledPlugin, Workspace
from registry.statuses import LIVE, TAKES_WORK, Status, Sync
from registry.verdicts import Liveness, Recorded, judge
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, write_tree

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LIVENESS = Liveness(offline_after_s=90.0, provision_timeout_s=600.0, offline_after_max_s=300.0)
ALLOWLIST = ("file:///srv/plugins/",)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def run(status: str, *, error: str | None = None, withheld: bool = False) -> Reconcile:
    return Reconcile(
        id=uuid.uuid4(),
        workspace_id=uuid.uuid4(),
        trigger="manual",
        status=status,
        refresh=False,
        attempt=2 if error else 1,
        created_at=ago(30),
        started_at=ago(29),
        finished_at=None if status in ("queued", "running") else ago(20),
        error=error,
        next_attempt_at=ago(-5),
        restart_requested=not withheld,
        restart_withheld=withheld,
    )


def restart(delivered: bool) -> PendingAction:
    return PendingAction(
        uuid.uuid4(), "restart", "plugins installed: a", ago(10), ago(8) if delivered else None
    )


PLUGIN_A = DeclaredPlugin("a", "file:///srv/plugins/a")
INSTALLED_A = InstalledPlugin("a", "file:///srv/plugins/a", "sha-a", ago(60), "digest-a")


@st.composite
def states(draw: st.DrawFn) -> Recorded:
    status = draw(st.sampled_from(list(Status)))
    silent_s = draw(st.sampled_from([1.0, 60.0, 91.0, 300.0, 3600.0]))
    never_beat = draw(st.booleans())
    # Refused beats since the last accepted one, or older ones already cleared by a beat.
    refused = draw(st.sampled_from(["none", "since_last_beat", "before_last_beat"]))
    previous_token = draw(st.sampled_from(["none", "in_grace", "expired"]))
    workspace = Workspace(
        id=uuid.uuid4(),
        name="w",
        status=status,
        status_changed_at=ago(draw(st.sampled_from([1.0, 100.0, 5000.0]))),
        created_at=ago(10_000),
        delivery="filesystem",
        url=None,
        agent_card=None,
        last_heartbeat_at=None if never_beat else ago(silent_s),
        error_rate=0.0,
        sample_error="",
        active_tasks=0,
        uptime_seconds=10.0,
        current_task="",
        monthly_spend=0.0,
        runtime_state="ok",
        observed_plugins=draw(
            st.sampled_from([None, [], [{"name": "a", "sha": "digest-a"}], [{"name": "a"}]])
        ),
        heartbeat_interval_s=draw(st.sampled_from([None, 5.0, 60.0])),
        previous_token_valid_until=None if previous_token == "none" else ago(-100),
        previous_token_used_at=(
            None if previous_token == "none" else ago(5 if previous_token == "in_grace" else 200)
        ),
        refused_at=None if refused == "none" else ago(2 if refused == "since_last_beat" else 4000),
        refused_count=0 if refused == "none" else 3,
        refused_status=None if refused == "none" else 400,
        refused_code=None if refused == "none" else "invalid_field",
    )
    if previous_token == "expired":
        workspace = _replace(workspace, previous_token_valid_until=ago(10))
    declared = draw(st.sampled_from([[], [PLUGIN_A]]))
    installed = draw(st.sampled_from([[], [INSTALLED_A]]))
    last = draw(
        st.sampled_from(
            [
                None,
                run("queued"),
                run("queued", error="fetch_failed: timed out"),
                run("running"),
                run("succeeded"),
                run("succeeded", withheld=True),
                run("failed", error="a: source_denied: not in the plugin allowlist"),
            ]
        )
    )
    pending = draw(st.sampled_from([(), (restart(False),), (restart(True),)]))
    guard_holding = draw(st.booleans())
    acknowledged = guard_holding and draw(st.booleans())
    guard = Guard(
        holding=guard_holding,
        since=ago(120) if guard_holding else None,
        live=40,
        stale=20 if guard_holding else 0,
        updated_at=ago(1),
        acked_at=ago(60) if acknowledged else None,
        acked_by="oncall" if acknowledged else None,
    )
    refuse = draw(st.booleans())
    refused_sources = (
        {"a": "source 'file:///srv/plugins/a' is not in the plugin allowlist"}
        if declared and refuse
        else {}
    )
    return Recorded(
        workspace,
        declared=declared,
        installed=installed,
        last=last,
        liveness=LIVENESS,
        now=NOW,
        pending=pending,
        status_cause=draw(st.sampled_from([None, "heartbeat_timeout", "resumed", "manual"])),
        guard=guard,
        refused_sources=refused_sources,
        allowlist=ALLOWLIST,
    )


def _replace(workspace: Workspace, **changes: object) -> Workspace:
    values = {name: getattr(workspace, name) for name in Workspace.__slots__}
    return Workspace(**{**values, **changes})


def silent_past_window(state: Recorded) -> bool:
    workspace = state.workspace
    heard_at = workspace.last_heartbeat_at or workspace.status_changed_at
    silent_s = (state.now - heard_at).total_seconds()
    return workspace.status in LIVE and silent_s > state.liveness.offline_after(workspace)


@settings(max_examples=600, deadline=None)
@given(state=states())
def test_the_verdicts_never_contradict_the_recorded_state(state: Recorded) -> None:
    verdict = judge(state)
    workspace, last = state.workspace, state.last
    restart_pending = any(a.type == "restart" for a in state.pending)
    failed = last is not None and last.status == "failed"
    active = last is not None and last.active
    withheld = last is not None and last.restart_withheld

    # `synced` is never shown while anything is pending or failed.
    if verdict.plugins_sync is Sync.SYNCED:
        assert not (restart_pending or failed or active or withheld or state.refused_sources)
    # `why` is present whenever the workspace is not online-and-synced, and heard from.
    online = workspace.status is Status.ONLINE and not silent_past_window(state)
    if not (online and verdict.plugins_sync is Sync.SYNCED):
        assert verdict.why
    # Ready exactly when online, synced and nothing pending or to tell.
    refusal_shown = workspace.refused_at is not None and (
        workspace.last_heartbeat_at is None or workspace.last_heartbeat_at < workspace.refused_at
    )
    token_shown = (
        workspace.previous_token_used_at is not None
        and workspace.previous_token_valid_until is not None
        and workspace.previous_token_valid_until > state.now
    )
    nothing_pending = not (restart_pending or active or refusal_shown or token_shown)
    assert verdict.ready is (online and verdict.plugins_sync is Sync.SYNCED and nothing_pending)
    assert verdict.ready is (verdict.why is None)
    # Usable: a live, heard-from workspace that is not failed; settling does not count.
    assert verdict.usable is (
        TAKES_WORK[workspace.status]
        and not silent_past_window(state)
        and verdict.plugins_sync is not Sync.FAILED
        and not state.refused_sources
    )
    if verdict.usable and workspace.status in LIVE:
        assert verdict.plugins_sync is not Sync.FAILED
    # The findings: each of these states is told, and truthfully.
    if silent_past_window(state) and state.guard is not None and state.guard.holding:
        assert verdict.why and "mass-expiry guard" in verdict.why
        if state.guard.acknowledged:
            assert "oncall acknowledged it" in verdict.why
        else:
            assert "held" in verdict.why
    if state.refused_sources:
        assert verdict.plugins_sync is not Sync.SYNCED
        assert verdict.why and "file:///srv/plugins/a" in verdict.why
        assert "allowlist" in verdict.why
        if state.installed and not active:
            assert "stays installed" in verdict.why
    if workspace.status is Status.OFFLINE and state.status_cause == "resumed":
        assert verdict.why and "resumed" in verdict.why and "of silence" not in verdict.why


def test_a_settling_workspace_is_usable_and_not_ready() -> None:
    workspace = _online()
    for settling in (
        {"last": run("running")},
        {"last": run("queued", error="fetch_failed: timed out")},
        {"last": run("succeeded"), "pending": (restart(True),)},
        {"last": run("succeeded", withheld=True)},
    ):
        verdict = judge(_recorded(workspace, **settling))
        assert (verdict.ready, verdict.usable) == (False, True), settling
    converged = judge(_recorded(workspace, last=run("succeeded")))
    assert (converged.plugins_sync, converged.ready, converged.usable) == (Sync.SYNCED, True, True)
    broken = judge(_recorded(workspace, last=run("failed", error="a: fetch_failed")))
    assert (broken.plugins_sync, broken.ready, broken.usable) == (Sync.FAILED, False, False)


def _online() -> Workspace:
    return Workspace(
        uuid.uuid4(), "w", Status.ONLINE, ago(100), ago(1000), "filesystem", None, None,
        ago(1), 0.0, "", 0, 10.0, "", 0.0, "ok", None,
    )  # fmt: skip


def _recorded(workspace: Workspace, **fields: object) -> Recorded:
    defaults: dict[str, object] = {
        "declared": [PLUGIN_A],
        "installed": [INSTALLED_A],
        "last": None,
        "liveness": LIVENESS,
        "now": NOW,
    }
    return Recorded(workspace, **{**defaults, **fields})  # type: ignore[arg-type]


# The findings, end to end


async def test_a_silent_workspace_held_online_by_the_guard_says_so(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    # Silent for five minutes, and the guard holds: the sweeper leaves it online.
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '300 seconds' WHERE id = $1",
        uuid.UUID(workspace.id),
    )
    await registry.db.execute(
        "UPDATE fleet_guard SET holding = true, since = now() - interval '60 seconds', "
        "live = 40, stale = 20"
    )

    shown = await registry.show(workspace)

    assert shown["status"] == "online"
    assert "silent for 300 s, past its offline window of 90 s" in shown["why"]
    assert "held online by the mass-expiry guard" in shown["why"]
    assert (shown["ready"], shown["usable"]) == (False, False)


async def test_a_beating_synced_workspace_is_ready(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    shown = await registry.show(workspace)

    assert (shown["plugins_sync"], shown["why"], shown["ready"], shown["usable"]) == (
        "synced",
        None,
        True,
        True,
    )


async def test_a_plugin_whose_source_the_tightened_allowlist_refuses_is_reported(
    make_registry: MakeRegistry, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "seo", {"plugin.py": "print('seo')\n"})
    before = await make_registry()
    workspace = await before.create_workspace([{"source": f"file://{plugin}"}])
    await before.heartbeat(workspace)
    await before.settled(workspace)
    actions = (await before.heartbeat(workspace))["actions"]
    await before.heartbeat(workspace, acks=[a["id"] for a in actions])
    assert (await before.show(workspace))["plugins_sync"] == "synced"
    await before.client.close()  # its worker would run the refresh with the old allowlist

    # The registry restarts with a tightened allowlist.
    registry = await make_registry(plugin_allowlist=("file:///srv/elsewhere/",))
    response = await registry.client.post(
        f"/internal/workspaces/{workspace.id}/reconcile", json={"refresh": True}, headers=ADMIN
    )
    assert response.status == 202, await response.text()
    runs = await registry.settled(workspace)
    shown = await registry.show(workspace)

    assert runs[-1]["status"] == "failed" and "source_denied" in runs[-1]["error"]
    assert shown["plugins_sync"] == "out_of_sync"
    assert f"file://{plugin}" in shown["why"]
    assert "plugin allowlist: file:///srv/elsewhere/" in shown["why"]
    assert "it stays installed" in shown["why"]
    assert [p["name"] for p in shown["installed_plugins"]] == ["seo"]
    assert (shown["ready"], shown["usable"]) == (False, False)


async def test_right_after_resume_the_offline_reason_is_truthful(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.client.post(f"/workspaces/{workspace.id}/pause", headers=ADMIN)
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '4 seconds' WHERE id = $1",
        uuid.UUID(workspace.id),
    )
    response = await registry.client.post(f"/workspaces/{workspace.id}/resume", headers=ADMIN)
    assert response.status == 200

    why = (await registry.show(workspace))["why"]

    assert why.startswith("resumed by an operator 0 s ago: waiting for a heartbeat")
    assert "last heartbeat 4 s ago" in why
    assert "of silence" not in why


async def test_list_summaries_carry_the_same_verdicts_as_the_full_view(
    registry: Registry, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "seo", {"plugin.py": "print('seo')\n"})
    ready = await registry.create_workspace()
    settling = await registry.create_workspace([{"source": f"file://{plugin}"}])
    provisioning = await registry.create_workspace()
    silent = await registry.create_workspace()
    for workspace in (ready, settling, silent):
        await registry.heartbeat(workspace)
        await registry.settled(workspace)
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '300 seconds' WHERE id = $1",
        uuid.UUID(silent.id),
    )

    response = await registry.client.get("/workspaces", headers=ADMIN)
    listed = {w["id"]: w for w in (await response.json())["workspaces"]}

    verdicts = {}
    for workspace in (ready, settling, provisioning, silent):
        shown = await registry.show(workspace)
        summary = listed[workspace.id]
        assert (summary["plugins_sync"], summary["ready"], summary["usable"]) == (
            shown["plugins_sync"],
            shown["ready"],
            shown["usable"],
        )
        verdicts[workspace.id] = (summary["ready"], summary["usable"])
    assert verdicts == {
        ready.id: (True, True),
        settling.id: (False, True),  # its restart is not acknowledged yet
        provisioning.id: (False, False),
        silent.id: (False, False),
    }


def test_a_workspace_silent_through_an_outage_says_its_silence_counts_from_after_it() -> None:
    # Silent for 200 s (its window is 90), but the registry could hear again only 2 s ago: the
    # sweeper counts its silence from then, and `why` says so, not "offline at the next sweep".
    workspace = _replace(_online(), last_heartbeat_at=ago(200))
    guard = Guard(
        holding=False, since=None, live=40, stale=0, updated_at=ago(1),
        silence_counted_from=ago(2),
    )  # fmt: skip

    verdict = judge(_recorded(workspace, guard=guard))

    assert verdict.why is not None
    assert "could not hear it until 2 s ago" in verdict.why
    assert "next sweep" not in verdict.why
