"""The filtered, keyset-paged list of workspaces: `GET /workspaces` filters, run in SQL.

The statement is put together from the constant fragments below, one per filter that is
present, and every value is a parameter: no request text ever reaches the SQL. One statement
per combination of filters (never `$n IS NULL OR ...`), so each combination's prepared plan
is the right one for it (see registry/db/workspaces.py's pages).

`plugins_sync` is derived in Python from everything recorded (registry/verdicts.py, the one
derivation), so SQL only narrows the candidates to those it can be (a necessary condition);
the handler judges them and keeps the matches.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from typing import Any

from registry.db import Connection
from registry.db.workspaces import FIRST_ID, WORKSPACE_COLUMNS, Workspace
from registry.labels import Selector
from registry.statuses import Status, Sync

HAS = ("refusal", "pending_restart", "failed_reconcile")

# The status of the workspace's latest reconcile run (last_reconciles' order).
_LATEST = """(SELECT r.status FROM reconciles r WHERE r.workspace_id = w.id
              ORDER BY r.created_at DESC, r.id DESC LIMIT 1)"""
# The conditions that hold for few workspaces are said as `w.id = ANY(ARRAY(...))`: the set
# is computed once, from a partial index, and the page read from the primary key in id order.
# Said as a correlated EXISTS, the planner walked the fleet in id order probing each row
# (60 ms for 1% of 100k, bench/filters.py).
_PENDING_RESTART = """w.id = ANY(ARRAY(SELECT a.workspace_id FROM workspace_actions a
    WHERE a.acked_at IS NULL AND a.type = 'restart'))"""
# Failed runs (reconciles_failed_idx) that are their workspace's latest, each checked with
# one probe of reconciles_workspace_idx (as NOT EXISTS of a newer one, the planner hashed
# every run of the fleet: 30 ms at 100k).
_FAILED_RECONCILE = """w.id = ANY(ARRAY(SELECT r.workspace_id FROM reconciles r
    WHERE r.status = 'failed' AND r.id = (
        SELECT n.id FROM reconciles n WHERE n.workspace_id = r.workspace_id
        ORDER BY n.created_at DESC, n.id DESC LIMIT 1)))"""
# Active runs (reconciles_due_idx).
_ACTIVE_RECONCILE = """w.id = ANY(ARRAY(SELECT r.workspace_id FROM reconciles r
    WHERE r.status IN ('queued', 'running')))"""

# Sync → a condition every workspace of that sync state meets (see verdicts._sync): only a
# workspace with an active run is reconciling (its latest is), only one whose latest run
# failed is failed, a synced one has neither nor a pending restart.
_SYNC_CANDIDATES = {
    Sync.RECONCILING: _ACTIVE_RECONCILE,
    Sync.FAILED: _FAILED_RECONCILE,
    Sync.SYNCED: f"COALESCE({_LATEST} NOT IN ('queued', 'running', 'failed'), true) "
    f"AND NOT ({_PENDING_RESTART})",
    Sync.OUT_OF_SYNC: f"COALESCE({_LATEST} NOT IN ('queued', 'running'), true)",
}

# The same condition as verdicts._refusal_reason: refused since its last accepted beat.
_HAS = {
    "refusal": "w.refused_at IS NOT NULL "
    "AND (w.last_heartbeat_at IS NULL OR w.last_heartbeat_at < w.refused_at)",
    "pending_restart": _PENDING_RESTART,
    "failed_reconcile": _FAILED_RECONCILE,
}

_IN_SET = "COALESCE(t.vs ? (w.labels ->> t.k), false)"


@dataclass(frozen=True, slots=True)
class Filters:
    statuses: tuple[str, ...] = ()
    syncs: tuple[Sync, ...] = ()
    selector: Selector | None = None
    name_prefix: str | None = None
    has: tuple[str, ...] = ()
    include_removed: bool = False

    @property
    def hides_removed(self) -> bool:
        # Tombstones show when asked for, or filtered for by status.
        return not self.include_removed and Status.REMOVED.value not in self.statuses


def _prefix_upper(prefix: str) -> str | None:
    """The least string above every string starting with `prefix`, in byte (UTF-8) order:
    its last character incremented (surrogates cannot be stored, so they are skipped)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if 0xD800 <= last <= 0xDFFF:
            last = 0xE000
        if last <= sys.maxunicode:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


class _Statement:
    def __init__(self, after: uuid.UUID, limit: int) -> None:
        self.args: list[Any] = [after, limit]
        self.conditions = ["w.id > $1"]

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def where(self, condition: str) -> None:
        self.conditions.append(condition)


def build(filters: Filters, after: uuid.UUID | None, limit: int) -> tuple[str, list[Any]]:
    """The statement and its arguments; its text depends only on which filters are present."""
    s = _Statement(FIRST_ID if after is None else after, limit)
    if filters.statuses:
        s.where(f"w.status = ANY({s.arg(list(filters.statuses))}::text[])")
    if filters.name_prefix is not None:
        lower = s.arg(filters.name_prefix)
        s.where(f"starts_with(w.name, {lower}) AND w.name ~>=~ {lower}")
        if (upper := _prefix_upper(filters.name_prefix)) is not None:
            s.where(f"w.name ~<~ {s.arg(upper)}")
    if filters.selector is not None:
        _selector(s, filters.selector)
    for has in filters.has:
        s.where(_HAS[has])
    if filters.syncs:
        s.where("(" + " OR ".join(f"({_SYNC_CANDIDATES[x]})" for x in filters.syncs) + ")")
    # Tombstones are a table of their own (migration 0017), read only when asked for.
    table = "workspaces" if filters.hides_removed else "all_workspaces"
    sql = (
        f"SELECT {WORKSPACE_COLUMNS} FROM {table} w WHERE "
        + "\n  AND ".join(s.conditions)
        + "\nORDER BY w.id LIMIT $2"
    )
    return sql, s.args


def _selector(s: _Statement, selector: Selector) -> None:
    if selector.equal:
        s.where(f"w.labels @> {s.arg(selector.equal)}::jsonb")
    # Keys of `in` terms must exist too: said as `?&`, the GIN index narrows them first.
    exists = sorted({*selector.exists, *selector.within})
    if exists:
        s.where(f"w.labels ?& {s.arg(exists)}::text[]")
    if selector.absent:
        s.where(f"NOT (w.labels ?| {s.arg(sorted(selector.absent))}::text[])")
    if selector.within:
        s.where(
            f"NOT EXISTS (SELECT 1 FROM jsonb_each({s.arg(selector.within)}::jsonb) AS t(k, vs) "
            f"WHERE NOT {_IN_SET})"
        )
    if selector.outside:
        s.where(
            f"NOT EXISTS (SELECT 1 FROM jsonb_each({s.arg(selector.outside)}::jsonb) AS t(k, vs) "
            f"WHERE {_IN_SET})"
        )


# How selective a filter is depends on its values (env=prod is most of a fleet, team=t7 a
# fiftieth): planned once for any values, a selector's statement read every prod workspace
# by the labels index and sorted them (70 ms at 100k) where reading in id order stops after
# a page (1 ms). Planning each execution costs about a millisecond.
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


async def list_filtered(
    conn: Connection, filters: Filters, *, after: uuid.UUID | None, limit: int
) -> list[Workspace]:
    sql, args = build(filters, after, limit)
    async with conn.transaction(readonly=True):
        await conn.execute(CUSTOM_PLANS)
        rows = await conn.fetch(sql, *args)
    return [Workspace.from_record(row) for row in rows]
