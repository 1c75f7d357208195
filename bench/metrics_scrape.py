"""What a /metrics scrape costs at a large fleet, seeded by SQL.

    .venv/bin/python -m bench.metrics_scrape [--workspaces 100000] [--scrapes 10]

Seeds N online workspaces with two declared plugins each, both installed, the runtime
reporting them (a few out of sync, a few with a restart pending, a few removed) and three
finished reconciles each, then serves the app in this process and times scrapes: uncached
(every scrape reads the fleet, `metrics_cache_s=0`) and cached (the default: within the cache
period no query runs). Also times the fleet aggregate alone, and prints the plan's top line.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from bench.db import DEFAULT_SERVER_DSN, drop, recreate
from bench.fleet import judge_plugins_sync
from registry.app import create_app
from registry.db.fleet_counts import FLEET_COUNTS
from registry.settings import Settings

DATABASE = "bench_metrics"

# One statement per table, set-based. Every 100th workspace reports one plugin at another
# sha (out of sync), every 50th has a restart not acknowledged, every 1000th is removed.
SEED = [
    # The runtimes' reports, beside the rows, which hold their digest (migration 0019).
    """
    INSERT INTO reported_plugins (workspace_id, plugins, changed_at)
    SELECT md5('m:' || n)::uuid,
           jsonb_build_array(
               jsonb_build_object('name', 'a', 'sha', CASE WHEN n % 100 = 0 THEN 'old'
                                                          ELSE 'sha-a' END),
               jsonb_build_object('name', 'b', 'sha', 'sha-b')),
           now() - interval '1 hour'
    FROM generate_series(1, $1) AS n
    """,
    """
    INSERT INTO workspaces (id, name, status, status_changed_at, token_hash, last_heartbeat_at,
                            reported_plugins_digest)
    SELECT md5('m:' || n)::uuid, 'bench-' || n,
           CASE WHEN n % 1000 = 0 THEN 'removed' ELSE 'online' END,
           now() - interval '1 hour', sha256(convert_to('m' || n, 'UTF8')), now(),
           (SELECT sha256(convert_to(r.plugins::text, 'UTF8')) FROM reported_plugins r
            WHERE r.workspace_id = md5('m:' || n)::uuid)
    FROM generate_series(1, $1) AS n
    """,
    """
    INSERT INTO declared_plugins (workspace_id, name, source, position)
    SELECT md5('m:' || n)::uuid, p.name, 'file:///plugins/' || p.name, p.pos
    FROM generate_series(1, $1) AS n, (VALUES ('a', 0), ('b', 1)) AS p(name, pos)
    """,
    """
    INSERT INTO installed_plugins (workspace_id, name, source, sha, installed_at)
    SELECT md5('m:' || n)::uuid, p.name, 'file:///plugins/' || p.name, 'sha-' || p.name,
           now() - interval '1 hour'
    FROM generate_series(1, $1) AS n, (VALUES ('a'), ('b')) AS p(name)
    """,
    """
    INSERT INTO reconciles (workspace_id, trigger, status, attempt, created_at, started_at,
                            finished_at, next_attempt_at)
    SELECT md5('m:' || n)::uuid, 'manual', 'succeeded', 1,
           now() - make_interval(hours => k), now() - make_interval(hours => k),
           now() - make_interval(hours => k), now() - make_interval(hours => k)
    FROM generate_series(1, $1) AS n, generate_series(1, 3) AS k
    """,
    """
    INSERT INTO workspace_actions (workspace_id, type, reason)
    SELECT md5('m:' || n)::uuid, 'restart', 'bench'
    FROM generate_series(50, $1, 50) AS n
    """,
]


async def seed(dsn: str, workspaces: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in SEED:
            await conn.execute(statement, workspaces)
        await conn.execute("VACUUM ANALYZE")
        await judge_plugins_sync(conn)
    finally:
        await conn.close()


async def time_aggregate(dsn: str, rounds: int) -> tuple[list[float], str]:
    conn = await asyncpg.connect(dsn)
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            await conn.fetch(FLEET_COUNTS)
            times.append(time.perf_counter() - started)
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT TEXT) {FLEET_COUNTS}")
        return times, "\n".join(row[0] for row in rows)
    finally:
        await conn.close()


async def time_scrapes(dsn: str, scrapes: int, cache_s: float, data_dir: Path) -> list[float]:
    settings = Settings(admin_token="bench-admin-token-0123", data_dir=data_dir,
                        metrics_cache_s=cache_s)  # fmt: skip
    client = TestClient(TestServer(create_app(settings, dsn)))
    await client.start_server()
    try:
        times = []
        for _ in range(scrapes):
            started = time.perf_counter()
            response = await client.get("/metrics")
            await response.read()
            assert response.status == 200
            times.append(time.perf_counter() - started)
        return times
    finally:
        await client.close()


def describe(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return (
        f"{label}: median {statistics.median(ms):.1f} ms, min {ms[0]:.1f}, max {ms[-1]:.1f} "
        f"({len(ms)} runs)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspaces", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--dsn", default=DEFAULT_SERVER_DSN)
    parser.add_argument("--plan", action="store_true", help="print the aggregate's whole plan")
    args = parser.parse_args()
    dsn = await recreate(args.dsn, DATABASE)
    try:
        started = time.perf_counter()
        await seed(dsn, args.workspaces)
        print(f"seeded {args.workspaces} workspaces in {time.perf_counter() - started:.1f} s")
        aggregate, plan = await time_aggregate(dsn, args.scrapes)
        print(describe("fleet aggregate alone", aggregate))
        print(plan if args.plan else plan.splitlines()[-1])
        with tempfile.TemporaryDirectory() as data_dir:
            uncached = await time_scrapes(dsn, args.scrapes, 0.0, Path(data_dir))
            cached = await time_scrapes(dsn, args.scrapes, 3600.0, Path(data_dir))
        print(describe("/metrics, uncached", uncached))
        # The first scrape of a process fills the cache; the rest are served from it.
        print(describe("/metrics, cached (after the first)", cached[1:]))
    finally:
        await drop(args.dsn, DATABASE)


if __name__ == "__main__":
    asyncio.run(main())
