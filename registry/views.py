"""JSON renderings of workspaces and reconciles, as the API returns them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from registry.db.actions import PendingAction
from registry.db.reconciles import Reconcile, Step
from registry.db.workspaces import DeclaredPlugin, InstalledPlugin, Workspace
from registry.errors import Gone, Unauthorized
from registry.liveness import OBSERVED_INTERVALS
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
    pending: Sequence[PendingAction] = (),
) -> str:
    if last is not None and last.active:
        return "reconciling"
    planned = plan(declared, {p.name: p for p in installed}, observed_shas(observed))
    if all(step.action == "skip" for step in planned):
        # Installed, but not loaded: the runtime was not asked to restart, or has not yet.
        withheld = last is not None and last.restart_withheld
        return "out_of_sync" if withheld or _restart_pending(pending) else "synced"
    if last is not None and last.status == "failed":
        return "failed"
    return "out_of_sync"


def _restart_pending(pending: Sequence[PendingAction]) -> PendingAction | None:
    return next((a for a in pending if a.type == "restart"), None)


@dataclass(frozen=True, slots=True)
class Liveness:
    offline_after_s: float
    provision_timeout_s: float
    offline_after_max_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Liveness:
        return cls(
            settings.resolved_offline_after_s,
            settings.provision_timeout_s,
            settings.offline_after_max_s,
        )

    def offline_after(self, workspace: Workspace) -> float:
        """The silence after which this workspace goes offline: the sweeper's rule
        (db/transitions.py), for showing."""
        observed = OBSERVED_INTERVALS * (workspace.heartbeat_interval_s or 0.0)
        return max(self.offline_after_s, min(observed, self.offline_after_max_s))


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
                f"offline after {liveness.offline_after(workspace):g} s of silence; "
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


def _refusal_reason(workspace: Workspace, now: datetime) -> str | None:
    """Refused runtime requests since its last accepted beat, if any."""
    refused_at = workspace.refused_at
    last_beat = workspace.last_heartbeat_at
    if refused_at is None or (last_beat is not None and last_beat >= refused_at):
        return None
    times = f"last {_ago(refused_at, now)}, {workspace.refused_count} times"
    if workspace.refused_status == Gone.status:
        return f"its runtime still heartbeats after the removal ({times}): stop its container"
    if workspace.refused_code == Unauthorized.code:
        return (
            f"heartbeats naming it come with a token that matches no workspace and are "
            f"refused ({times}): give its runtime the workspace's token"
        )
    if workspace.refused_code == "token_rotated":
        return (
            f"its runtime uses a rotated token and is refused ({times}): "
            "give it the workspace's new token"
        )
    field = "" if workspace.refused_field is None else f" ({workspace.refused_field})"
    return (
        f"its runtime's heartbeats are refused: {workspace.refused_status} "
        f"{workspace.refused_code}{field} ({times})"
    )


def _previous_token_reason(workspace: Workspace, now: datetime) -> str | None:
    """The runtime still authenticates with the token an operator rotated away."""
    used_at = workspace.previous_token_used_at
    valid_until = workspace.previous_token_valid_until
    if used_at is None or valid_until is None or valid_until <= now:
        return None
    left = round((valid_until - now).total_seconds())
    return (
        f"its runtime still uses the previous token (last {_ago(used_at, now)}), which stops "
        f"working in {left} s: give it the new token"
    )


def _restart_reason(pending: Sequence[PendingAction], now: datetime) -> str | None:
    restart = _restart_pending(pending)
    if restart is None:
        return None
    handed = (
        "not yet handed out"
        if restart.delivered_at is None
        else f"handed out {_ago(restart.delivered_at, now)}, not acknowledged"
    )
    return (
        f"waiting for the runtime to restart ({restart.reason}): asked "
        f"{_ago(restart.created_at, now)}, {handed}"
    )


def why_not_ready(
    workspace: Workspace,
    sync: str,
    last: Reconcile | None,
    liveness: Liveness,
    pending: Sequence[PendingAction] = (),
) -> str | None:
    """A plain-language answer to "why is this workspace not online and synced?"."""
    now = datetime.now(UTC)
    reasons = [
        reason
        for reason in (
            _status_reason(workspace, liveness, now),
            _refusal_reason(workspace, now),
            _previous_token_reason(workspace, now),
        )
        if reason is not None
    ]
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
    elif (restart := _restart_reason(pending, now)) is not None:
        reasons.append(restart)
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
    pending: Sequence[PendingAction] = (),
) -> dict[str, Any]:
    sync = plugins_sync(declared, installed, workspace.observed_plugins, last, pending)
    now = datetime.now(UTC)
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
        # The runtime's own heartbeat interval as observed, and the silence that takes this
        # workspace offline (it follows that interval).
        "liveness": {
            "observed_interval_s": workspace.heartbeat_interval_s,
            "offline_after_s": liveness.offline_after(workspace),
        },
        "last_refusal": _refusal_view(workspace),
        "token": {
            "rotated_at": workspace.token_rotated_at,
            "previous_valid_until": workspace.previous_token_valid_until,
            "previous_used_at": workspace.previous_token_used_at,
        },
        "pending_actions": [_action_view(a, now) for a in pending],
        "declared_plugins": [{"name": p.name, "source": p.source} for p in declared],
        "installed_plugins": [
            {"name": p.name, "source": p.source, "sha": p.sha, "installed_at": p.installed_at}
            for p in installed
        ],
        "observed_plugins": workspace.observed_plugins,
        "plugins_sync": sync,
        "last_reconcile": None if last is None else reconcile_view(last),
        "why": why_not_ready(workspace, sync, last, liveness, pending),
    }


def _refusal_view(workspace: Workspace) -> dict[str, Any] | None:
    if workspace.refused_at is None:
        return None
    return {
        "at": workspace.refused_at,
        "since": workspace.refused_since,
        "count": workspace.refused_count,
        "status": workspace.refused_status,
        "code": workspace.refused_code,
        "field": workspace.refused_field,
    }


def _action_view(action: PendingAction, now: datetime) -> dict[str, Any]:
    return {
        "id": action.id,
        "type": action.type,
        "reason": action.reason,
        "created_at": action.created_at,
        "delivered_at": action.delivered_at,
        "age_s": round((now - action.created_at).total_seconds(), 1),
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
