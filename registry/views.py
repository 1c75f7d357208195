"""JSON renderings of workspaces and reconciles, as the API returns them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from registry.db.actions import PendingAction
from registry.db.reconciles import Reconcile, Step
from registry.db.workspaces import Workspace
from registry.verdicts import Recorded, judge


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


def workspace_view(state: Recorded) -> dict[str, Any]:
    """The full view; its derived fields come from registry/verdicts.py's one function."""
    workspace, now = state.workspace, state.now
    verdict = judge(state)
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
            "offline_after_s": state.liveness.offline_after(workspace),
        },
        "last_refusal": _refusal_view(workspace),
        "token": {
            "rotated_at": workspace.token_rotated_at,
            "previous_valid_until": workspace.previous_token_valid_until,
            "previous_used_at": workspace.previous_token_used_at,
        },
        "pending_actions": [_action_view(a, now) for a in state.pending],
        "declared_plugins": [{"name": p.name, "source": p.source} for p in state.declared],
        "installed_plugins": [
            {"name": p.name, "source": p.source, "sha": p.sha, "installed_at": p.installed_at}
            for p in state.installed
        ],
        "observed_plugins": workspace.observed_plugins,
        "plugins_sync": verdict.plugins_sync.value,
        "last_reconcile": None if state.last is None else reconcile_view(state.last),
        "why": verdict.why,
        "ready": verdict.ready,
        "usable": verdict.usable,
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


def workspace_summary(state: Recorded) -> dict[str, Any]:
    """The short form used in lists; its verdicts are the full view's."""
    workspace, verdict = state.workspace, judge(state)
    return {
        **_identity(workspace),
        "last_heartbeat_at": workspace.last_heartbeat_at,
        "plugins_sync": verdict.plugins_sync.value,
        "why": verdict.why,
        "ready": verdict.ready,
        "usable": verdict.usable,
    }


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
        "labels": workspace.labels or {},
    }
