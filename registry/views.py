"""JSON renderings of workspaces and reconciles, as the API returns them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from registry.db.reconciles import Reconcile, Step
from registry.db.workspaces import DeclaredPlugin, InstalledPlugin, Workspace
from registry.reconcile.plan import observed_shas, plan
from registry.settings import Settings
from registry.statuses import Status


def step_view(step: Step) -> dict[str, Any]:
    return {
        "plugin": step.plugin,
        "action": step.action,
        "status": step.status,
        "source": step.source,
        "sha": step.sha,
        "attempt": step.attempt,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "error": step.error,
    }


def reconcile_view(run: Reconcile) -> dict[str, Any]:
    return {
        "id": run.id,
        "workspace_id": run.workspace_id,
        "trigger": run.trigger,
        "status": run.status,
        "refresh": run.refresh,
        "attempt": run.attempt,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "error": run.error,
        "next_attempt_at": run.next_attempt_at,
        "steps": [step_view(s) for s in run.steps],
        "restart_requested": run.restart_requested,
        "restart_withheld": run.restart_withheld,
    }


def plugins_sync(
    declared: list[DeclaredPlugin],
    installed: list[InstalledPlugin],
    observed: list[dict[str, Any]] | None,
    last: Reconcile | None,
) -> str:
    if last is not None and last.active:
        return "reconciling"
    planned = plan(declared, {p.name: p for p in installed}, observed_shas(observed))
    if all(step.action == "skip" for step in planned):
        # Installed, but the runtime was not asked to load it: not in sync on the box.
        return "out_of_sync" if last is not None and last.restart_withheld else "synced"
    if last is not None and last.status == "failed":
        return "failed"
    return "out_of_sync"


@dataclass(frozen=True, slots=True)
class Liveness:
    offline_after_s: float
    provision_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Liveness:
        return cls(settings.resolved_offline_after_s, settings.provision_timeout_s)


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return f"{max(0, round((now - moment).total_seconds()))} s ago"


def _status_reason(workspace: Workspace, liveness: Liveness, now: datetime) -> str | None:
    since = workspace.status_changed_at
    last_beat = workspace.last_heartbeat_at
    match workspace.status:
        case Status.ONLINE:
            return None
        case Status.PROVISIONING:
            return (
                f"waiting for the runtime's first heartbeat (created {_ago(since, now)}; "
                f"failed if none within {liveness.provision_timeout_s:g} s)"
            )
        case Status.DEGRADED:
            return (
                f"degraded since {_ago(since, now)}: error rate {workspace.error_rate}, "
                f"runtime state {workspace.runtime_state!r}; online again below an error "
                "rate of 0.1 and not wedged"
            )
        case Status.OFFLINE:
            return (
                f"offline since {_ago(since, now)}: last heartbeat {_ago(last_beat, now)}, "
                f"offline after {liveness.offline_after_s:g} s of silence; "
                "waiting for a heartbeat"
            )
        case Status.FAILED:
            return (
                f"failed {_ago(since, now)}: no first heartbeat within "
                f"{liveness.provision_timeout_s:g} s; a heartbeat brings it online"
            )
        case Status.PAUSED:
            return (
                f"paused by an operator {_ago(since, now)}; heartbeats are recorded "
                f"(last {_ago(last_beat, now)}) but do not promote it until resumed"
            )
        case Status.REMOVED:
            return f"removed {_ago(since, now)}; its runtime is told to stop (410)"


def why_not_ready(
    workspace: Workspace, sync: str, last: Reconcile | None, liveness: Liveness
) -> str | None:
    """A plain-language answer to "why is this workspace not online and synced?"."""
    reasons = []
    status_reason = _status_reason(workspace, liveness, datetime.now(UTC))
    if status_reason is not None:
        reasons.append(status_reason)
    if sync == "reconciling" and last is not None and last.status == "queued" and last.error:
        reasons.append(
            f"reconcile attempt {last.attempt} failed: {last.error}; "
            f"next attempt at {last.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}"
        )
    elif sync == "reconciling":
        reasons.append("plugin reconcile in progress")
    elif last is not None and last.restart_withheld:
        reasons.append(
            "plugins were installed but the restart budget is used up, so the runtime was not "
            "asked to restart; it loads them at its next restart"
        )
    elif sync == "failed" and last is not None:
        reasons.append(f"last reconcile failed (attempt {last.attempt}): {last.error}")
    elif sync == "out_of_sync":
        reasons.append("declared plugins are not all installed yet")
    return "; ".join(reasons) or None


def workspace_view(
    workspace: Workspace,
    *,
    declared: list[DeclaredPlugin],
    installed: list[InstalledPlugin],
    last: Reconcile | None,
    liveness: Liveness,
) -> dict[str, Any]:
    sync = plugins_sync(declared, installed, workspace.observed_plugins, last)
    return {
        **_identity(workspace),
        "agent_card": workspace.agent_card,
        "heartbeat": {
            "last_heartbeat_at": workspace.last_heartbeat_at,
            "error_rate": workspace.error_rate,
            "sample_error": workspace.sample_error,
            "active_tasks": workspace.active_tasks,
            "uptime_seconds": workspace.uptime_seconds,
            "current_task": workspace.current_task,
            "monthly_spend": workspace.monthly_spend,
            "runtime_state": workspace.runtime_state,
        },
        "declared_plugins": [{"name": p.name, "source": p.source} for p in declared],
        "installed_plugins": [
            {"name": p.name, "source": p.source, "sha": p.sha, "installed_at": p.installed_at}
            for p in installed
        ],
        "observed_plugins": workspace.observed_plugins,
        "plugins_sync": sync,
        "last_reconcile": None if last is None else reconcile_view(last),
        "why": why_not_ready(workspace, sync, last, liveness),
    }


def workspace_summary(workspace: Workspace) -> dict[str, Any]:
    """The short form used in lists."""
    return {**_identity(workspace), "last_heartbeat_at": workspace.last_heartbeat_at}


def _identity(workspace: Workspace) -> dict[str, Any]:
    """What every rendering of a workspace starts with."""
    return {
        "id": workspace.id,
        "name": workspace.name,
        "status": workspace.status.value,
        "status_changed_at": workspace.status_changed_at,
        "created_at": workspace.created_at,
        "delivery": workspace.delivery,
        "url": workspace.url,
    }
