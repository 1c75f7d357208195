"""Hot queries keep the right plan when planned generically (prepared statement reuse).

asyncpg prepares every statement, and after five executions PostgreSQL may switch to a
generic plan that cannot see parameter values. A filter shape like "$2 IS NULL OR column = $2"
then falls onto a scan of a whole index. Forcing the generic plan (plan_cache_mode works on
PostgreSQL 15 and 16; EXPLAIN (GENERIC_PLAN) is 16+ only) shows which index it would use.
"""

from __future__ import annotations

import re
import uuid

import asyncpg
import pytest

from registry.db import events, reconciles, workspaces
from registry.db.heartbeats import HEARTBEATS
from registry.db.migrate import migrate
from registry.db.pool import HEARTBEAT_SERVER_SETTINGS

# Tombstones inserted into `workspaces` move to `removed_workspaces` (migration 0017).
SEED = """
INSERT INTO workspaces (id, name, status, token_hash)
SELECT gen_random_uuid(), 'w' || g, CASE WHEN g % 10 = 0 THEN 'online' ELSE 'removed' END,
       sha256(g::text::bytea)
FROM generate_series(1, 5000) AS g;
INSERT INTO workspace_events (workspace_id, kind, cause, seq)
SELECT ids[1 + g % array_length(ids, 1)], 'status', 'seed', g
FROM generate_series(1, 20000) AS g, (SELECT array_agg(id) AS ids FROM workspaces) AS w;
ANALYZE workspaces;
ANALYZE removed_workspaces;
INSERT INTO reconciles (workspace_id, trigger, status, finished_at)
SELECT id, 'manual', 'succeeded', now() FROM workspaces, generate_series(1, 4);
ANALYZE workspace_events;
ANALYZE reconciles;
"""

HOT_QUERIES = [
    ("events after", events.SELECT_EVENTS_AFTER, "(0, 100)", "workspace_events_seq_key"),
    (
        "a workspace's events after",
        events.SELECT_WORKSPACE_EVENTS_AFTER,
        f"(0, '{uuid.uuid4()}', 100)",
        "workspace_events_workspace_seq_idx",
    ),
    (
        "live list page",
        workspaces.SELECT_LIVE_PAGE,
        f"('{workspaces.FIRST_ID}', 100)",
        "workspaces_pkey",
    ),
    (
        "status list page",
        workspaces.SELECT_STATUS_PAGE,
        f"('{workspaces.FIRST_ID}', 100, 'failed')",
        "workspaces_status_idx",
    ),
    (
        "list page with tombstones",
        workspaces.SELECT_ALL_PAGE,
        f"('{workspaces.FIRST_ID}', 100)",
        "workspaces_pkey",
    ),
    (
        "list page with tombstones (their table)",
        workspaces.SELECT_ALL_PAGE,
        f"('{workspaces.FIRST_ID}', 100)",
        "removed_workspaces_pkey",
    ),
    (
        "a page's last runs",
        reconciles.SELECT_LAST_RECONCILES,
        f"(ARRAY['{uuid.uuid4()}', '{uuid.uuid4()}']::uuid[])",
        "reconciles_workspace_idx",
    ),
    (
        "a page's status causes",
        events.SELECT_STATUS_CAUSES,
        f"(ARRAY['{uuid.uuid4()}']::uuid[], ARRAY['online'], ARRAY[now()])",
        "workspace_events_workspace_seq_idx",
    ),
    (
        "removed list page",
        workspaces.SELECT_REMOVED_PAGE,
        f"('{workspaces.FIRST_ID}', 100)",
        "removed_workspaces_pkey",
    ),
]


@pytest.mark.parametrize(
    ("name", "sql", "args", "index"), HOT_QUERIES, ids=[q[0] for q in HOT_QUERIES]
)
async def test_the_generic_plan_uses_the_index(
    db: asyncpg.Connection, name: str, sql: str, args: str, index: str
) -> None:
    await db.execute(SEED)
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE hot AS {sql}")
    try:
        plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN EXECUTE hot{args}"))
    finally:
        await db.execute("DEALLOCATE hot")
        await db.execute("RESET plan_cache_mode")
    # Newest first walks the index backwards; a small table is read by a bitmap of the index:
    # each is a walk bounded by the index condition, not a scan of the whole table.
    assert re.search(rf"(Index Scan (Backward )?using|Bitmap Index Scan on) {index}\b", plan), plan
    assert "Seq Scan" not in plan, plan


async def test_the_heartbeat_plan_made_on_an_empty_table_reads_by_primary_key(
    empty_dsn: str,
) -> None:
    """Mutant: the heartbeat pool without `enable_seqscan = off`: a fresh registry's first
    generic plan scans the (then empty, never analysed) workspaces table, and keeps doing so for
    every batch once the fleet has grown, until the table is next analysed."""
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn, server_settings=HEARTBEAT_SERVER_SETTINGS)
    try:
        await conn.execute(f"PREPARE beat AS {HEARTBEATS}")
        fresh = await _plan(conn)
        await conn.execute(
            "INSERT INTO workspaces (name, token_hash, status) "
            "SELECT 'w' || g, sha256(g::text::bytea), 'online' FROM generate_series(1, 20000) g"
        )
        grown = await _plan(conn)
    finally:
        await conn.close()
    for plan in (fresh, grown):
        assert "Seq Scan on workspaces" not in plan, plan
        assert "Index Scan using workspaces_pkey on workspaces" in plan, plan


# One beat's parameters, in HEARTBEATS' order.
BEAT_ARGS = (
    f"ARRAY['{uuid.uuid4()}'::uuid], ARRAY['\\x00'::bytea], ARRAY['healthy'], ARRAY[0.0::float8],"
    " ARRAY[''], ARRAY[1], ARRAY[1.0::float8], ARRAY[''], ARRAY[0.0::float8], ARRAY['ok'],"
    " ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY['heartbeat'],"
    " ARRAY['healthy'], ARRAY['online'], ARRAY['online'], ARRAY['provisioning'],"
    " ARRAY['online'], '{}'::uuid[], '{}'::uuid[], 300.0, 300.0, ARRAY[NULL::text]"
)


async def _plan(conn: asyncpg.Connection) -> str:
    return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE beat({BEAT_ARGS})"))
