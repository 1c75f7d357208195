"""What the dashboard's chart costs: GET /fleet/history's one read against paging through the
same hour of events the way `GET /events/history` would.

    .venv/bin/python -m bench.fleet_history [--workspaces 10000] [--old-events 1000000]
                                            [--recent-events 36000] [--samples 20]

Seeds a fleet and an event log by SQL in a database of its own (bench_fleet_history): old
status events spread over two weeks, and `--recent-events` flips spread over the last hour
(36,000: ten a second). Then times, as p50/p99 of `--samples` runs each:
- `status_history` (registry/db/fleet_history.py), the whole of GET /fleet/history's work;
- the same aggregate without the primary-key floor (a filter on `at` alone: a scan of the log);
- reading the hour's events in pages of 500 with the statement /events/history runs, starting
  at the first event of the hour (as if the client knew it; the JSON and HTTP of ~N/500
  requests come on top), which is what the page would do without the dedicated route.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg

from bench import db as bench_db
from bench.stats import Latencies
from registry.db import events, fleet_history

DATABASE = "bench_fleet_history"

SEED_WORKSPACES = """
INSERT INTO workspaces (id, name, status, token_hash)
SELECT md5('history:' || n)::uuid, 'ws-' || n,
       CASE WHEN n % 10 < 8 THEN 'online' WHEN n % 10 = 8 THEN 'offline' ELSE 'degraded' END,
       sha256(('history:' || n)::bytea)
FROM generate_series(1, $1) n
"""

# Old first, then the recent hour: ids (and seq) follow `at`, as they do in a live log.
SEED_EVENTS = """
INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor, at, seq)
SELECT md5('history:' || (1 + i % $1))::uuid, 'status',
       CASE WHEN i % 2 = 0 THEN 'online' ELSE 'degraded' END,
       CASE WHEN i % 2 = 0 THEN 'degraded' ELSE 'online' END,
       'bench', 'bench', $3::timestamptz + (i * $4::float8) * interval '1 second', $5 + i
FROM generate_series(1, $2) i
"""


async def seed(conn: asyncpg.Connection, workspaces: int, old: int, recent: int) -> None:
    await conn.execute(SEED_WORKSPACES, workspaces)
    now = await conn.fetchval("SELECT now()")
    two_weeks_s, hour_s = 14 * 86400.0, 3600.0
    await conn.execute(
        SEED_EVENTS,
        workspaces,
        old,
        now - timedelta(seconds=two_weeks_s),
        (two_weeks_s - hour_s - 60) / old,
        0,
    )
    await conn.execute(
        SEED_EVENTS,
        workspaces,
        recent,
        now - timedelta(seconds=hour_s - 1),
        (hour_s - 2) / recent,
        old,
    )
    await conn.execute("ANALYZE")


NO_FLOOR = """
SELECT GREATEST(0, floor(extract(epoch FROM $1 - at) / 60))::int AS ago,
       from_status, to_status, count(*)::int AS n
FROM workspace_events
WHERE kind = 'status' AND at > $1 - interval '1 hour'
GROUP BY 1, 2, 3
"""

FIRST_OF_HOUR = """
SELECT min(seq) FROM workspace_events WHERE at > now() - interval '1 hour'
"""


async def timed(samples: int, run: Callable[[], Awaitable[None]]) -> Latencies:
    taken = []
    for _ in range(samples):
        started = time.perf_counter()
        await run()
        taken.append(time.perf_counter() - started)
    return Latencies.of(taken)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--old-events", type=int, default=1_000_000)
    parser.add_argument("--recent-events", type=int, default=36_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--server-dsn", default=bench_db.DEFAULT_SERVER_DSN)
    args = parser.parse_args()
    dsn = await bench_db.recreate(args.server_dsn, DATABASE)
    conn = await asyncpg.connect(dsn)
    try:
        await seed(conn, args.workspaces, args.old_events, args.recent_events)
        first = int(await conn.fetchval(FIRST_OF_HOUR)) - 1

        async def dedicated() -> None:
            await fleet_history.status_history(conn, 60)

        async def no_floor() -> None:
            await conn.fetch(NO_FLOOR, await conn.fetchval("SELECT now()"))

        async def paged() -> None:
            after = first
            while page := await events.events_after(conn, after, workspace_id=None, limit=500):
                after = page[-1].id

        results = {
            "GET /fleet/history's read (status_history)": await timed(args.samples, dedicated),
            "the same aggregate without the primary-key floor": await timed(args.samples, no_floor),
            "the hour's events in pages of 500 (/events/history's statement)": await timed(
                max(1, args.samples // 4), paged
            ),
        }
    finally:
        await conn.close()
        await bench_db.drop(args.server_dsn, DATABASE)
    print(
        f"{args.workspaces} workspaces, {args.old_events} older events, "
        f"{args.recent_events} in the last hour"
    )
    for name, latencies in results.items():
        print(
            f"  {name}: p50 {latencies.p50_s * 1e3:.1f} ms, p99 {latencies.p99_s * 1e3:.1f} ms"
            f" ({latencies.count} runs)"
        )


if __name__ == "__main__":
    asyncio.run(main())
