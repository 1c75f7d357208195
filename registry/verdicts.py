"""Derived state: what every view says about a workspace, from what was recorded about it.

One pure function, `judge`, turns the recorded state (`Recorded`) into the verdicts
(`Verdict`: `plugins_sync`, `why`, `ready`, `usable`), so the JSON view, the CLI and anything
else that shows a workspace tell the same story, and a property test can check that story
over generated states (tests/test_verdicts.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from registry.db.actions import PendingAction
from registry.db.fleet import Guard
from registry.db.reconciles import Reconcile
from registry.db.workspaces import DeclaredPlugin, InstalledPlugin, Workspace
from registry.errors import Gone, Unauthorized
from registry.liveness import OBSERVED_INTERVALS
from registry.reconcile.plan import observed_shas, plan
from registry.settings import Settings
from registry.statuses import LIVE, Status, Sync, classify_use

# The cause the liveness sweeper records when silence takes a workspace offline.
SILENCE_CAUSE = "heartbeat_timeout"


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


@dataclass(frozen=True, slots=True)
class Recorded:
    """Everything the verdicts are derived from, read by the caller (the only I/O)."""

    workspace: Workspace
    declared: Sequence[DeclaredPlugin]
    installed: Sequence[InstalledPlugin]
    last: Reconcile | None
    liveness: Liveness
    now: datetime
    pending: Sequence[PendingAction] = ()
    # The cause recorded with the change into the current status; None if unknown.
    status_cause: str | None = None
    guard: Guard | None = None
    # Declared plugins whose source the allowlist refuses now: name → the refusal.
    refused_sources: Mapping[str, str] = field(default_factory=dict)
    allowlist: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    plugins_sync: Sync
    why: str | None  # None exactly when ready
    ready: bool
    usable: bool


def judge(state: Recorded) -> Verdict:
    """The one derivation of a workspace's plugin state, explanation and readiness."""
    sync = _sync(state)
    silence = _silence_reason(state)
    reasons = [
        reason
        for reason in (
            _status_reason(state),
            silence,
            _refusal_reason(state.workspace, state.now),
            _previous_token_reason(state.workspace, state.now),
            _plugins_reason(state, sync),
            *_source_reasons(state),
        )
        if reason is not None
    ]
    use = classify_use(
        state.workspace.status,
        sync,
        heard=silence is None,
        source_refused=bool(state.refused_sources),
        attention=bool(reasons),
    )
    return Verdict(
        plugins_sync=sync, why="; ".join(reasons) or None, ready=use.ready, usable=use.usable
    )


def _converged(state: Recorded) -> bool:
    steps = plan(
        state.declared,
        {p.name: p for p in state.installed},
        observed_shas(state.workspace.observed_plugins),
    )
    return all(step.action == "skip" for step in steps)


def _sync(state: Recorded) -> Sync:
    sync = recorded_sync(state)
    if state.refused_sources and sync is not Sync.RECONCILING and _converged(state):
        # Installed and declared, but the allowlist refuses it now (a refresh of it fails
        # with source_denied): not in the state the policy asks for.
        return Sync.OUT_OF_SYNC
    return sync


def recorded_sync(state: Recorded) -> Sync:
    """The plugin state from what the database records alone, the allowlist aside: the value
    stored in workspaces.plugins_sync (registry/sync_state.py). The allowlist, a setting of
    each process, can only turn a converged, idle workspace's state into out_of_sync."""
    last = state.last
    failed = last is not None and last.status == "failed"
    if last is not None and last.active:
        return Sync.RECONCILING
    if not _converged(state):
        return Sync.FAILED if failed else Sync.OUT_OF_SYNC
    if failed:
        return Sync.FAILED  # e.g. a refresh that could not resolve: nothing was checked
    # Installed, but not loaded: the runtime was not asked to restart, or has not yet.
    withheld = last is not None and last.restart_withheld
    return Sync.OUT_OF_SYNC if withheld or _restart_pending(state.pending) else Sync.SYNCED


def _restart_pending(pending: Sequence[PendingAction]) -> PendingAction | None:
    return next((a for a in pending if a.type == "restart"), None)


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return f"{max(0, round((now - moment).total_seconds()))} s ago"


def _status_reason(state: Recorded) -> str | None:
    workspace, liveness, now = state.workspace, state.liveness, state.now
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
            return _offline_reason(state)
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


def _offline_reason(state: Recorded) -> str:
    workspace, now = state.workspace, state.now
    since, last_beat = workspace.status_changed_at, workspace.last_heartbeat_at
    if state.status_cause == SILENCE_CAUSE:
        return (
            f"offline since {_ago(since, now)}: last heartbeat {_ago(last_beat, now)}, "
            f"offline after {state.liveness.offline_after(workspace):g} s of silence; "
            "waiting for a heartbeat"
        )
    # Not silence: a resume (paused → offline) or another writer. Its silence says nothing
    # about why it is offline, so none is claimed.
    if state.status_cause == "resumed":
        how = f"resumed by an operator {_ago(since, now)}"
    else:
        how = f"offline since {_ago(since, now)} ({state.status_cause or 'cause unknown'})"
    return (
        f"{how}: waiting for a heartbeat to bring it online (last heartbeat {_ago(last_beat, now)})"
    )


def _silence(state: Recorded) -> tuple[float, float]:
    """(seconds since it was last heard from, the silence that takes it offline)."""
    workspace = state.workspace
    heard_at = workspace.last_heartbeat_at or workspace.status_changed_at
    return (state.now - heard_at).total_seconds(), state.liveness.offline_after(workspace)


def _silence_reason(state: Recorded) -> str | None:
    """A live workspace silent past its window: shown as live, but not heard from."""
    if state.workspace.status not in LIVE:
        return None
    silent_s, window_s = _silence(state)
    if silent_s <= window_s:
        return None
    silent = f"silent for {silent_s:.0f} s, past its offline window of {window_s:g} s"
    guard = state.guard
    heard_again = guard.silence_counted_from if guard is not None else None
    if heard_again is not None and (state.now - heard_again).total_seconds() <= window_s:
        # The sweeper counts no silence from before the registry could hear again.
        return (
            f"{silent}, but the registry could not hear it until {_ago(heard_again, state.now)} "
            "(an outage of the database or of the registry): its silence counts from then, so "
            "it goes offline only if it does not call in within its window"
        )
    if guard is not None and guard.acknowledged:
        return (
            f"would be offline: {silent}; the mass-expiry guard holds (since "
            f"{_ago(guard.since, state.now)}), but {guard.acked_by} acknowledged it "
            f"{_ago(guard.acked_at, state.now)}: the liveness sweeper takes it offline at its "
            "next sweep"
        )
    if guard is not None and guard.holding:
        return (
            f"would be offline: {silent}; held {state.workspace.status} by the mass-expiry guard "
            f"since {_ago(guard.since, state.now)} ({guard.stale} of {guard.live} live "
            f"workspaces silent, {guard.expired} taken offline within the window); it goes offline "
            "at the guard's slow rate, once the guard lets go, or once an operator acknowledges "
            "the guard (POST /fleet/guard/ack)"
        )
    return (
        f"{silent}: the liveness sweeper takes it offline at its next sweep (a registry that "
        "just started first gives every workspace one liveness window)"
    )


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
    field_name = "" if workspace.refused_field is None else f" ({workspace.refused_field})"
    return (
        f"its runtime's heartbeats are refused: {workspace.refused_status} "
        f"{workspace.refused_code}{field_name} ({times})"
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


def _plugins_reason(state: Recorded, sync: Sync) -> str | None:
    last = state.last
    if sync is Sync.RECONCILING and last is not None and last.status == "queued" and last.error:
        return (
            f"reconcile attempt {last.attempt} failed: {last.error}; "
            f"next attempt at {last.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}"
        )
    if (
        sync is Sync.RECONCILING
        and last is not None
        and last.status == "queued"
        and last.next_attempt_at is not None
        and last.next_attempt_at > state.now
    ):
        # e.g. the check after a runtime restarted on its own, held back by its rate limit.
        return (
            f"a plugin reconcile ({last.trigger}) is queued, due at "
            f"{last.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}"
        )
    if sync is Sync.RECONCILING:
        trigger = "" if last is None else f" ({last.trigger})"
        return f"plugin reconcile{trigger} in progress"
    if last is not None and last.restart_withheld and sync is not Sync.FAILED:
        return (
            "plugins were installed but the restart budget is used up, so the runtime was not "
            "asked to restart; it loads them at its next restart"
        )
    if sync is Sync.FAILED and last is not None:
        return f"last reconcile failed (attempt {last.attempt}): {last.error}"
    if (restart := _restart_reason(state.pending, state.now)) is not None:
        return restart
    if sync is Sync.SYNCED or (state.refused_sources and _converged(state)):
        return None  # synced, or out of sync only for refused sources (told below)
    if unreported := _unreported(state):
        return (
            f"its runtime does not report installed plugins: {', '.join(unreported)}; if that "
            "lasts (a box replaced, say) they are installed again (trigger drift_detected)"
        )
    return "declared plugins are not all installed yet"


def _unreported(state: Recorded) -> list[str]:
    """Plugins installed as declared that the runtime's own report lacks."""
    steps = plan(
        state.declared,
        {p.name: p for p in state.installed},
        observed_shas(state.workspace.observed_plugins),
    )
    # An install of a plugin with a record: the record the runtime does not confirm.
    return [s.plugin for s in steps if s.action == "install" and s.installed_sha is not None]


def _source_reasons(state: Recorded) -> list[str]:
    """Declared plugins whose source the allowlist refuses now (it was tightened)."""
    installed = {p.name for p in state.installed}
    allowlist = ", ".join(state.allowlist) or "empty: every source is refused"
    reasons = []
    for plugin in state.declared:
        refusal = state.refused_sources.get(plugin.name)
        if refusal is None:
            continue
        told = f"plugin {plugin.name}: {refusal} (plugin allowlist: {allowlist})"
        if plugin.name in installed:
            reasons.append(
                f"{told}; it stays installed: the registry removes a plugin only when the "
                "declared set no longer has it, so remove its declaration "
                f"(PUT /workspaces/{state.workspace.id}/plugins) or allow its source"
            )
        else:
            reasons.append(f"{told}, so it cannot be installed")
    return reasons
