"""What the planner and the heap see of a bench fleet: table sizes, dead rows, statistics, id
order, and the heartbeat statement's plans on a batch of the fleet's own beats."""

from __future__ import annotations

import random
import time

import asyncpg

from bench.fleet import UPTIME_SPREAD, Fleet
from bench.statement_ab import beat
from registry.db.heartbeats import HEARTBEATS, arguments
from registry.db.pool import HEARTBEAT_SERVER_SETTINGS

TABLES = (
    "workspaces",
    "workspace_events",
    "reconciles",
    "reconcile_steps",
    "workspace_actions",
    "installed_plugins",
    "declared_plugins",
)

TABLE_STATE = """
SELECT c.relname, c.reltuples::bigint AS reltuples, c.relpages, s.n_live_tup, s.n_dead_tup,
       s.n_mod_since_analyze, pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes,
       extract(epoch FROM now() - GREATEST(s.last_analyze, s.last_autoanalyze)) AS analysed_s,
       extract(epoch FROM now() - GREATEST(s.last_vacuum, s.last_autovacuum)) AS vacuumed_s
FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname = ANY($1::text[])
ORDER BY array_position($1::text[], c.relname::text)
"""

# How well the heap's order follows the id's (1: the same order; 0: none), as last analysed.
ID_ORDER = """
SELECT correlation FROM pg_stats
WHERE schemaname = 'public' AND tablename = 'workspaces' AND attname = 'id'
"""


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:,.0f} s ago"


async def tables(dsn: str) -> str:
    """A Markdown table of the fleet's tables as the statistics views see them now."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(TABLE_STATE, list(TABLES))
        correlation = await conn.fetchval(ID_ORDER)
    finally:
        await conn.close()
    lines = [
        "| table | reltuples | relpages | live | dead | changed since analyse | heap KiB "
        "| indexes KiB | analysed | vacuumed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += [
        f"| {r['relname']} | {r['reltuples']:,} | {r['relpages']:,} | {r['n_live_tup']:,} "
        f"| {r['n_dead_tup']:,} | {r['n_mod_since_analyze']:,} | {r['heap'] // 1024:,} "
        f"| {r['indexes'] // 1024:,} | {_ago(r['analysed_s'])} | {_ago(r['vacuumed_s'])} |"
        for r in rows
    ]
    order = "not analysed" if correlation is None else f"{correlation:.3f}"
    lines.append(f"\nworkspaces.id order vs heap order (pg_stats correlation): {order}")
    return "\n".join(lines)


async def _literals(conn: asyncpg.Connection, values: list[object]) -> list[str]:
    """HEARTBEATS' parameters as SQL literals of their types (for EXPLAIN EXECUTE)."""
    statement = await conn.prepare(HEARTBEATS)
    literals = []
    for param, value in zip(statement.get_parameters(), values, strict=True):
        name = await conn.fetchval("SELECT format_type($1::oid, NULL)", param.oid)
        quoted = await conn.fetchval(f"SELECT quote_nullable(($1::{name})::text)", value)
        literals.append(f"{quoted}::{name}")
    return literals


async def heartbeat_plans(dsn: str, fleet: Fleet, batch: int = 100) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one batch of `batch` random workspaces' steady beats on a
    connection set up as the registry's heartbeat pool sets them (generic plans), then with
    custom plans; each in a transaction rolled back."""
    sample = sorted(random.sample(range(1, fleet.size + 1), min(batch, fleet.size)))
    # No uptime below what any of them last sent: not a restart.
    uptime = fleet.uptime_base + UPTIME_SPREAD + int(time.time()) - fleet.epoch
    beats = [beat(fleet, n, float(uptime), fleet.plugins(n)) for n in sample]
    conn = await asyncpg.connect(dsn, server_settings=HEARTBEAT_SERVER_SETTINGS)
    out = []
    try:
        literals = await _literals(conn, arguments(beats))
        await conn.execute(f"PREPARE beat AS {HEARTBEATS}")
        for mode in ("force_generic_plan", "force_custom_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            transaction = conn.transaction()
            await transaction.start()
            try:
                rows = await conn.fetch(
                    f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE beat({', '.join(literals)})"
                )
            finally:
                await transaction.rollback()
            out.append(f"heartbeat statement, {len(beats)} beats, plan_cache_mode={mode}:")
            out += [row[0] for row in rows]
    finally:
        await conn.close()
    return "\n".join(out)
