"""Workspace statuses: the legal transitions, and what a heartbeat does to each status."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Status(enum.StrEnum):
    PROVISIONING = "provisioning"
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    FAILED = "failed"
    PAUSED = "paused"
    REMOVED = "removed"


S = Status

# Every status change anywhere in the registry must be one of these.
LEGAL_TRANSITIONS: frozenset[tuple[Status, Status]] = frozenset(
    {
        (S.PROVISIONING, S.ONLINE),
        (S.PROVISIONING, S.DEGRADED),
        (S.PROVISIONING, S.FAILED),
        (S.ONLINE, S.DEGRADED),
        (S.ONLINE, S.OFFLINE),
        (S.DEGRADED, S.ONLINE),
        (S.DEGRADED, S.OFFLINE),
        (S.OFFLINE, S.ONLINE),
        (S.OFFLINE, S.DEGRADED),
        (S.FAILED, S.ONLINE),
        (S.FAILED, S.DEGRADED),
        *((s, S.PAUSED) for s in S if s not in (S.PAUSED, S.REMOVED)),
        (S.PAUSED, S.OFFLINE),  # resume: the next heartbeat decides online or degraded
        *((s, S.REMOVED) for s in S if s is not S.REMOVED),
    }
)


def legal_sources(to: Status) -> frozenset[Status]:
    """The statuses a workspace may move to `to` from."""
    return frozenset(a for a, b in LEGAL_TRANSITIONS if b is to)


# A workspace in one of these serves traffic.
LIVE = frozenset({S.ONLINE, S.DEGRADED})

# Entering a live status from one of these means a (possibly new) box: reconcile its plugins.
RECONCILE_ON_ENTRY_FROM = frozenset({S.PROVISIONING, S.OFFLINE, S.FAILED})

# Error-rate hysteresis, so a workspace hovering near one threshold does not flap.
DEGRADED_AT = 0.5
RECOVERED_BELOW = 0.1


class Health(enum.StrEnum):
    """What one heartbeat says about the runtime, before the previous status is known."""

    HEALTHY = "healthy"  # error rate below RECOVERED_BELOW and not wedged
    UNWELL = "unwell"  # in between: keeps online online and degraded degraded
    DEGRADED = "degraded"  # error rate at or above DEGRADED_AT, or wedged


def classify_heartbeat(error_rate: float, runtime_state: str) -> Health:
    if runtime_state == "wedged" or error_rate >= DEGRADED_AT or math.isnan(error_rate):
        return Health.DEGRADED
    if error_rate < RECOVERED_BELOW:
        return Health.HEALTHY
    return Health.UNWELL


def heartbeat_target(previous: Status, health: Health) -> Status:
    """The status a heartbeat of this health moves `previous` to (maybe itself)."""
    if previous in (S.PAUSED, S.REMOVED):
        return previous  # operator hold and tombstone: never promoted
    if health is Health.DEGRADED:
        return S.DEGRADED
    if health is Health.HEALTHY or previous is not S.DEGRADED:
        return S.ONLINE
    return S.DEGRADED


@dataclass(frozen=True, slots=True)
class TransitionTable:
    """A from→to mapping in the array form SQL statements join against."""

    from_statuses: list[str]
    to_statuses: list[str]


def _heartbeat_table(health: Health) -> TransitionTable:
    pairs = [(s, heartbeat_target(s, health)) for s in S]
    changes = [(a, b) for a, b in pairs if a is not b]
    illegal = [pair for pair in changes if pair not in LEGAL_TRANSITIONS]
    assert not illegal, f"heartbeat rule yields illegal transitions: {illegal}"
    return TransitionTable([a.value for a, _ in changes], [b.value for _, b in changes])


# Precomputed once: the heartbeat statement is given the table for the beat's health, so
# this module stays the only place that knows the rules.
HEARTBEAT_TABLES: dict[Health, TransitionTable] = {h: _heartbeat_table(h) for h in Health}
RECONCILE_ENTRY_FROM: list[str] = sorted(s.value for s in RECONCILE_ON_ENTRY_FROM)
LIVE_STATUSES: list[str] = sorted(s.value for s in LIVE)


class Sync(enum.StrEnum):
    """Where a workspace's plugins stand (registry/verdicts.py derives it)."""

    SYNCED = "synced"  # nothing to do, and the runtime loaded it (no restart pending)
    OUT_OF_SYNC = "out_of_sync"  # installed but not loaded, not all installed, or refused now
    RECONCILING = "reconciling"  # a run is queued or running (a retry after a transient error too)
    FAILED = "failed"  # the last run failed for good


# DESIGN lesson 16, usable is not ready. `ready`: nothing to wait for and nothing to explain.
# `usable`: it can take work now. A workspace that is still settling (a reconcile running or
# waiting for its retry, a restart not yet acknowledged, plugins not loaded yet) is usable;
# only a real failure sends a caller back to repair. The rule, in the two tables below:
# usable = the status takes work (TAKES_WORK), the workspace was heard from within its offline
# window, its plugin state is usable (SYNC_USABLE) and no declared source is refused by the
# allowlist; ready = usable, online, synced and nothing else to tell (`why` is null). A live
# workspace silent past its window (held online by the mass-expiry guard, or waiting for the
# next sweep) is not heard from, so not usable. README.md shows the table.
TAKES_WORK: dict[Status, bool] = {
    S.ONLINE: True,
    S.DEGRADED: True,  # serves, with errors: still usable, never ready
    S.PROVISIONING: False,  # never heard from yet
    S.OFFLINE: False,
    S.FAILED: False,
    S.PAUSED: False,  # operator hold
    S.REMOVED: False,
}
SYNC_USABLE: dict[Sync, bool] = {
    Sync.SYNCED: True,
    Sync.RECONCILING: True,
    Sync.OUT_OF_SYNC: True,
    Sync.FAILED: False,
}


@dataclass(frozen=True, slots=True)
class Use:
    ready: bool
    usable: bool


def classify_use(
    status: Status, sync: Sync, *, heard: bool, source_refused: bool, attention: bool
) -> Use:
    """`heard`: a live workspace beat within its offline window; `source_refused`: a declared
    source the allowlist now refuses; `attention`: anything else `why` has to tell."""
    usable = TAKES_WORK[status] and heard and SYNC_USABLE[sync] and not source_refused
    ready = usable and status is S.ONLINE and sync is Sync.SYNCED and not attention
    return Use(ready=ready, usable=usable)
