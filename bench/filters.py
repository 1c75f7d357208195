"""`GET /workspaces` filters on a 100k fleet: p50/p99 per filter, of the SQL and of the request.

    python -m bench.filters [--size 100000] [--requests 40] [--server-dsn DSN]

Seeds a fleet by SQL in a database of its own (bench_filters): statuses, labels, two declared
and installed plugins each (reported by the runtime, so most are synced), one finished
reconcile each, and a few percent with a failed or queued latest run, a pending restart or a
refused beat. Then, for each filter, times (1) the list statement alone, as the registry runs
it (registry/db/filters.py), and (2) the whole request to a `registry serve` process, which
also reads the page's recorded state and judges each workspace (registry/verdicts.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from bench import db as bench_db
from bench.fleet import judge_plugins_sync
from bench.registry_proc import ADMIN_TOKEN, start
from bench.stats import Latencies
from registry.db.filters import list_filtered
from registry.db.pool import init_connection
from registry.list_filters import parse_filters

DATABASE = "bench_filters"

# n is the workspace's index; every share below is a residue of n, so the fleet is the
# same on every run. About: 85% online, 5% offline, 3% degraded, 3% paused, 2% provisioning,
# 2% removed; env prod 60% / staging 25% / dev 15%; 50 teams; 5% canary; 10% legacy.
REPORT = """'[{"name": "p1", "sha": "abc"}, {"name": "p2", "sha": "abc"}]'::jsonb"""
SEED_WORKSPACES = """
INSERT INTO workspaces (id, name, status, token_hash, last_heartbeat_at, labels,
                        reported_plugins_digest, refused_at, refused_since, refused_count,
                        refused_status, refused_code)
SELECT md5('filters:' || n)::uuid,
       'ws-' || lpad(n::text, 6, '0'),
       CASE WHEN n % 100 < 85 THEN 'online' WHEN n % 100 < 90 THEN 'offline'
            WHEN n % 100 < 93 THEN 'degraded' WHEN n % 100 < 96 THEN 'paused'
            WHEN n % 100 < 98 THEN 'provisioning' ELSE 'removed' END,
       sha256(('filters:' || n)::bytea),
       -- A refused beat came after the last accepted one.
       now() - CASE WHEN n % 200 = 5 THEN interval '1 minute' ELSE interval '0' END,
       jsonb_strip_nulls(jsonb_build_object(
           'env', CASE WHEN n % 20 < 12 THEN 'prod' WHEN n % 20 < 17 THEN 'staging'
                       ELSE 'dev' END,
           'tier', CASE WHEN n % 20 = 1 THEN 'canary' WHEN n % 3 = 0 THEN 'web'
                        ELSE 'worker' END,
           'team', 't' || (n % 50),
           'legacy', CASE WHEN n % 10 = 4 THEN '' END,
           'example.com/owner', 'o' || (n % 7))),
       sha256(convert_to(REPORT::text, 'UTF8')),
       CASE WHEN n % 200 = 5 THEN now() END,
       CASE WHEN n % 200 = 5 THEN now() END,
       CASE WHEN n % 200 = 5 THEN 3 ELSE 0 END,
       CASE WHEN n % 200 = 5 THEN 400 END,
       CASE WHEN n % 200 = 5 THEN 'invalid_field' END
FROM generate_series(1, $1::int) AS n
""".replace("REPORT", REPORT)
# What each runtime reports (migration 0019: beside the row, its digest in it).
SEED_REPORTED = f"""
INSERT INTO reported_plugins (workspace_id, plugins, changed_at)
SELECT id, {REPORT}, now() FROM all_workspaces
"""
SEED_DECLARED = """
INSERT INTO declared_plugins (workspace_id, name, source, position)
SELECT w.id, p.name, $1 || p.name, p.position
FROM workspaces w, (VALUES ('p1', 0), ('p2', 1)) AS p(name, position)
"""
SEED_INSTALLED = """
INSERT INTO installed_plugins (workspace_id, name, source, sha)
SELECT workspace_id, name, source, 'abc' FROM declared_plugins
"""
# One finished run each; 1% then failed (the latest), 0.5% have one queued an hour away;
# 1% wait for a restart.
SEED_SUCCEEDED = """
INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at)
SELECT id, 'online_transition', 'succeeded', now() - interval '2 hours', now()
FROM workspaces
"""
SEED_FAILED = """
INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at, error, attempt)
SELECT md5('filters:' || n)::uuid, 'manual', 'failed', now() - interval '1 hour', now(),
       'fetch failed', 3
FROM generate_series(1, $1::int) AS n WHERE n % 100 = 7
"""
SEED_QUEUED = """
INSERT INTO reconciles (workspace_id, trigger, next_attempt_at)
SELECT md5('filters:' || n)::uuid, 'manual', now() + interval '1 hour'
FROM generate_series(1, $1::int) AS n WHERE n % 200 = 3
"""
SEED_RESTARTS = """
INSERT INTO workspace_actions (workspace_id, type, reason)
SELECT md5('filters:' || n)::uuid, 'restart', 'plugins changed'
FROM generate_series(1, $1::int) AS n WHERE n % 100 = 11
"""

FILTERS = [
    "",
    "status=offline",
    "status=online,degraded",
    "status=removed",
    "selector=env%3Dprod",
    "selector=team%3Dt7",
    "selector=env%3Dprod,tier!%3Dcanary,team,!legacy",
    "selector=env%20in%20(staging,dev)",
    "selector=example.com/owner%3Do3,env%20notin%20(dev)",
    "name_prefix=ws-0999",
    "has=refusal",
    "has=pending_restart",
    "has=failed_reconcile",
    "plugins_sync=failed",
    "plugins_sync=reconciling",
    "plugins_sync=out_of_sync",
    "plugins_sync=synced",
    "status=online&selector=env%3Dprod&has=failed_reconcile",
    "status=online&selector=team%3Dt7&name_prefix=ws-09",
    "include_removed=true&selector=!legacy",
]


async def seed(dsn: str, size: int, plugins_dir: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SEED_WORKSPACES, size)
        await conn.execute(SEED_REPORTED)
        await conn.execute(SEED_DECLARED, f"file://{plugins_dir}/")
        await conn.execute(SEED_INSTALLED)
        await conn.execute(SEED_SUCCEEDED)
        for statement in (SEED_FAILED, SEED_QUEUED, SEED_RESTARTS):
            await conn.execute(statement, size)
        await conn.execute("VACUUM ANALYZE")
        await judge_plugins_sync(conn)
    finally:
        await conn.close()


class _Query:
    """Just enough of a request for parse_filters: the same parsing as the handler."""

    def __init__(self, query: str) -> None:
        from multidict import MultiDict
        from yarl import URL

        self.query: MultiDict[str] = MultiDict(URL("/?" + query).query)


async def time_sql(dsn: str, query: str, requests: int, limit: int) -> Latencies:
    filters = parse_filters(_Query(query))  # type: ignore[arg-type]
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    samples = []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            await list_filtered(conn, filters, after=None, limit=limit + 1)
            samples.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return Latencies.of(samples)


async def time_http(url: str, query: str, requests: int, limit: int) -> tuple[Latencies, int]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    samples = []
    shown = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(requests):
            started = time.perf_counter()
            async with session.get(f"{url}/workspaces?limit={limit}&{query}") as response:
                body = await response.json()
                assert response.status == 200, body
            samples.append(time.perf_counter() - started)
            shown = len(body["workspaces"])
    return Latencies.of(samples), shown


async def run(args: argparse.Namespace, work_dir: Path) -> list[dict[str, object]]:
    dsn = await bench_db.recreate(args.server_dsn, DATABASE)
    plugins_dir = work_dir / "plugins"
    for name in ("p1", "p2"):
        (plugins_dir / name).mkdir(parents=True)
        (plugins_dir / name / "plugin.py").write_text("print('bench')\n")
    started = time.perf_counter()
    await seed(dsn, args.size, plugins_dir)
    print(f"seeded {args.size} workspaces in {time.perf_counter() - started:.1f} s", flush=True)
    registry = start(
        dsn,
        work_dir,
        {
            "REGISTRY_PLUGIN_ALLOWLIST": f"file://{plugins_dir}/",
            # Nothing goes offline or is provisioned away while it is measured.
            "REGISTRY_OFFLINE_AFTER_S": "86400",
            "REGISTRY_PROVISION_TIMEOUT_S": "86400",
        },
    )
    rows = []
    try:
        registry.wait_healthy()
        for query in FILTERS:
            sql = await time_sql(dsn, query, args.requests, args.limit)
            http, shown = await time_http(registry.url, query, args.requests, args.limit)
            rows.append({"filter": query or "(none)", "shown": shown, "sql": sql, "http": http})
    finally:
        registry.stop()
        if not args.keep:
            await bench_db.drop(args.server_dsn, DATABASE)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.filters", description=__doc__)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=40, help="per filter")
    parser.add_argument("--limit", type=int, default=100, help="page size")
    parser.add_argument("--server-dsn", default=bench_db.DEFAULT_SERVER_DSN)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-filters-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print(f"\n{args.size} workspaces, first page of {args.limit}, {args.requests} runs each")
    print(f"{'filter':58} {'shown':>5}  {'sql p50':>8} {'sql p99':>8}  {'http p50':>8} {'p99':>8}")
    for row in rows:
        sql, http = row["sql"], row["http"]
        assert isinstance(sql, Latencies) and isinstance(http, Latencies)
        print(
            f"{row['filter']!s:58} {row['shown']!s:>5}  {sql.p50_s * 1e3:8.1f} "
            f"{sql.p99_s * 1e3:8.1f}  {http.p50_s * 1e3:8.1f} {http.p99_s * 1e3:8.1f}"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                [
                    {**row, "sql": row["sql"].to_json(), "http": row["http"].to_json()}  # type: ignore[attr-defined]
                    for row in rows
                ],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
