"""The filtered, keyset-paged list of workspaces: `GET /workspaces` filters, run in SQL.

The statement is put together from the constant fragments below, one per filter that is
present, and every value is a parameter: no request text ever reaches the SQL. One statement
per combination of filters (never `$n IS NULL OR ...`), so each combination's prepared plan
is the right one for it (see registry/db/workspaces.py's pages).

`plugins_sync` is read from its stored value (workspaces.plugins_sync, kept by
registry/sync_state.py with the one derivation, registry/verdicts.py) by index. SQL selects the
candidates (the stored value matches, or it is not known yet: the workspace is marked as
changed), and the handler judges them and keeps the matches: a marked workspace is shown as it
is now, and so is one whose source the allowlist refuses now (a setting of this process, not
stored: see `_sync_candidates`).
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
# Workspaces whose stored value is not known to be current: changed since it was last judged
# (marked by the database; judged again within about a second), or never judged (NULL, and
# marked too). Few.
_MARKED = "SELECT m.workspace_id FROM plugins_sync_dirty m"
# A converged, idle workspace whose source the allowlist refuses now is out_of_sync while its
# stored value (the database's part) says synced or failed (verdicts._sync).
_REFUSED_SOURCE = "SELECT d.workspace_id FROM declared_plugins d WHERE d.source = ANY({}::text[])"


def _sync_candidates(s: _Statement, filters: Filters) -> str:
    """Every workspace that may be in one of the sync states asked for (the handler judges):
    its stored value is one of them, or it is marked, or (for out_of_sync) it declares a
    source the allowlist refuses now."""
    syncs = s.arg([x.value for x in filters.syncs])
    others = [_MARKED]
    if Sync.OUT_OF_SYNC in filters.syncs and filters.refused_sources:
        others.append(_REFUSED_SOURCE.format(s.arg(list(filters.refused_sources))))
    if Sync.SYNCED in filters.syncs:
        # Most of a fleet: a page is its first rows in id order, read with a predicate.
        arms = [f"w.plugins_sync = ANY({syncs}::text[])"]
        arms += [f"w.id = ANY(ARRAY({other}))" for other in others]
        return "(" + " OR ".join(arms) + ")"
    # The rare states, like the other rare conditions: their ids read once, from the index
    # alone (workspaces_plugins_sync_idx), and the page from the primary key in id order. Said
    # as a predicate OR'ed with the marks, the planner read all 1,000 out_of_sync rows of a
    # 100k fleet from the heap and sorted them (23-33 ms, bench/filters.py's fleet).
    stored = f"SELECT s.id FROM workspaces s WHERE s.plugins_sync = ANY({syncs}::text[])"
    return f"w.id = ANY(ARRAY({' UNION ALL '.join([stored, *others])}))"


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
    # Declared sources the allowlist of this process refuses now (set by the handler).
    refused_sources: tuple[str, ...] = ()

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
    if filters.hides_removed:
        s.where("w.status <> 'removed'")
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
        s.where(_sync_candidates(s, filters))
    sql = (
        f"SELECT {WORKSPACE_COLUMNS} FROM workspaces w WHERE "
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


# The distinct declared sources, one probe of declared_plugins_source_idx each (a loose index
# scan): a fleet declares few sources however many workspaces declare them.
DECLARED_SOURCES = """
WITH RECURSIVE s AS (
    (SELECT source FROM declared_plugins ORDER BY source LIMIT 1)
    UNION ALL
    SELECT (SELECT d.source FROM declared_plugins d WHERE d.source > s.source
            ORDER BY d.source LIMIT 1)
    FROM s WHERE s.source IS NOT NULL
)
SELECT source FROM s WHERE source IS NOT NULL
"""


async def declared_sources(conn: Connection) -> list[str]:
    return [row["source"] for row in await conn.fetch(DECLARED_SOURCES)]
