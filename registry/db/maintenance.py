"""What the registry needs of the server's own maintenance, checked once at start.

The heartbeat path rewrites every live workspace row every interval: PostgreSQL keeps the
table small only by pruning and vacuuming the dead versions, and keeps its plans right only by
analysing it, both of which autovacuum does. On a server with autovacuum off (or with it off
for one of our tables) nothing does either: measured in docs/benchmarks.md ("Synthetic vs
realistic fleet"), `workspaces` grew to 25 MB for 1,000 rows in two minutes of beats and was
never analysed at all. Nothing breaks at once, so the registry says so loudly at start instead.
"""

from __future__ import annotations

import logging

import asyncpg

from registry.db import Connection

log = logging.getLogger(__name__)

# autovacuum needs track_counts: without the counters it never knows a table needs work.
SELECT_SERVER_SETTINGS = """
SELECT current_setting('autovacuum')::boolean AS autovacuum,
       current_setting('track_counts')::boolean AS track_counts
"""

# Tables of this schema whose storage options turn autovacuum off for them alone.
SELECT_TABLES_WITHOUT_AUTOVACUUM = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
  AND c.relkind = 'r'
  AND c.reloptions @> ARRAY['autovacuum_enabled=false']
ORDER BY c.relname
"""


async def maintenance_problems(conn: Connection) -> list[str]:
    """Why the server will not vacuum and analyse the registry's tables, one line each;
    empty when it will."""
    autovacuum, track_counts = await conn.fetchrow(SELECT_SERVER_SETTINGS) or (True, True)
    problems = []
    if not autovacuum:
        problems.append("the server runs with autovacuum = off")
    if not track_counts:
        problems.append("the server runs with track_counts = off (autovacuum needs it)")
    for row in await conn.fetch(SELECT_TABLES_WITHOUT_AUTOVACUUM):
        problems.append(f"table {row['relname']} has autovacuum_enabled = false")
    return problems


async def check_server(dsn: str, *, connect_timeout_s: float) -> list[str]:
    """The start-up check on a connection of its own: one warning logged per problem found,
    which are returned (for the caller's tests). A check that cannot run is itself only a
    warning: it must never keep the registry from starting."""
    try:
        conn = await asyncpg.connect(dsn, timeout=connect_timeout_s)
        try:
            problems = await maintenance_problems(conn)
        finally:
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        log.warning("database maintenance not checked: %s: %s", type(exc).__name__, exc)
        return []
    for problem in problems:
        log.warning(
            "database maintenance: %s: the workspaces table will bloat with every heartbeat "
            "and its statistics go stale; turn autovacuum on (docs/operations.md)",
            problem,
        )
    return problems
