"""History at scale: what churn costs on disk, and the read routes over a big history.

    .venv/bin/python -m bench.history sizes [--workspaces 200] [--flaps 10]
    .venv/bin/python -m bench.history scale [--workspaces 100000] [--events 10000000]
                                            [--runs 2000000] [--samples 200]
    .venv/bin/python -m bench.history tombstones [--workspaces 100000] [--samples 200]
    .venv/bin/python -m bench.history double-write [--events 10000000]

`sizes` drives real churn through a registry process (workspaces with a plugin flap
offline → online, each flap a reconcile), then prints rows and bytes (heap, TOAST and
indexes) per flap for every history table and a sizing table: what each workspace keeps with
the default retention at a few churn rates, and what 100k of them keep.

`scale` seeds a fleet and a history by SQL (100k workspaces, 10M events, 2M finished runs
with a step each, the oldest 30% past retention), starts a registry, keeps heartbeats
flowing, and prints p50/p99 of every read route, then the pruner's rate (rows/s) with the
heartbeats still flowing.

`tombstones` times /fleet, /metrics (uncached), a list page and a sweep with N live
workspaces, then again beside 10 N removed ones. `double-write` measures the WAL and time of
numbering events after their insert (the sequencer) against numbering them at insert.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import db, registry_proc
from bench.fleet import Fleet, judge_plugins_sync, seed
from bench.stats import Latencies
from registry.db import fleet as fleet_db
from registry.db import fleet_counts, transitions, workspaces
from registry.db.events import SEQUENCE_PENDING
from registry.liveness import SweepPolicy, sweep
from registry.retention import RetentionPolicy, prune
from registry.settings import Settings
from registry.statuses import LIVE_STATUSES

HISTORY_TABLES = ("workspace_events", "reconciles", "reconcile_steps", "workspace_actions")
ADMIN = {"Authorization": f"Bearer {registry_proc.ADMIN_TOKEN}"}
DAY_S = 86400.0
TARGET_P99_S = 0.050


# sizes


async def _table_sizes(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """(rows, bytes with TOAST and indexes) per history table."""
    sizes = {}
    for table in HISTORY_TABLES:
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        sizes[table] = (int(rows), int(size))
    return sizes


async def _drained(conn: asyncpg.Connection, within_s: float = 600.0) -> None:
    deadline = time.monotonic() + within_s
    busy = """SELECT count(*) FROM reconciles
              WHERE status = 'running' OR (status = 'queued' AND next_attempt_at <= now())"""
    while await conn.fetchval(busy):
        if time.monotonic() > deadline:
            raise RuntimeError("reconciles did not drain")
        await asyncio.sleep(0.2)


async def _churn(url: str, dsn: str, plugin: Path, workspaces: int, flaps: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        async with aiohttp.ClientSession(headers=ADMIN) as session:
            fleet: list[tuple[str, str]] = []
            for n in range(workspaces):
                body = {"name": f"churn-{n}", "plugins": [{"source": f"file://{plugin}"}]}
                async with session.post(f"{url}/workspaces", json=body) as response:
                    created = await response.json()
                fleet.append((created["workspace"]["id"], created["token"]))

            async def beat(workspace_id: str, token: str) -> None:
                auth = {"Authorization": f"Bearer {token}"}
                async with session.post(
                    f"{url}/registry/heartbeat", json={"workspace_id": workspace_id}, headers=auth
                ) as response:
                    answer = await response.json()
                actions = answer.get("actions") or []
                if actions:  # the runtime restarts and acknowledges, as real ones do
                    body = {"workspace_id": workspace_id, "acks": [a["id"] for a in actions]}
                    async with session.post(
                        f"{url}/registry/heartbeat", json=body, headers=auth
                    ) as response:
                        await response.read()

            async def everyone() -> None:
                await asyncio.gather(*(beat(w, t) for w, t in fleet))

            await everyone()
            await _drained(conn)
            await everyone()  # restarts acknowledged
            before = await _table_sizes(conn)
            for _ in range(flaps):
                # The sweeper's expiry, then the runtime back: offline → online, a reconcile.
                await conn.execute(
                    "UPDATE workspaces SET status = 'offline' WHERE status = 'online'"
                )
                await everyone()
                await _drained(conn)
                await everyone()
            await conn.execute("VACUUM (ANALYZE) workspace_events, reconciles, reconcile_steps")
            after = await _table_sizes(conn)
    finally:
        await conn.close()
    total = workspaces * flaps
    per_flap: dict[str, tuple[float, float]] = {}
    lines = [
        f"{workspaces} workspaces x {flaps} flaps = {total} offline -> online flaps",
        "",
        "| table | rows per flap | bytes per row | bytes per flap |",
        "|---|---|---|---|",
    ]
    for table in HISTORY_TABLES:
        rows = after[table][0] - before[table][0]
        size = after[table][1] - before[table][1]
        per_row = size / rows if rows else 0.0
        per_flap[table] = (rows / total, per_row)
        lines.append(f"| {table} | {rows / total:.2f} | {per_row:,.0f} | {size / total:,.0f} |")
    return [*lines, "", *_sizing(per_flap)]


def _sizing(per_flap: dict[str, tuple[float, float]]) -> list[str]:
    """Rows and bytes one workspace keeps in steady state with the default retention."""
    settings = Settings()
    lines = [
        "Steady state with the defaults (events 14 d, at least the last "
        f"{settings.event_keep_per_workspace}; runs 14 d, at least the last "
        f"{settings.reconcile_keep_per_workspace}; acknowledged actions "
        f"{settings.action_retention_s / DAY_S:g} d):",
        "",
        "| flaps per workspace per day | written per day (rows / KB) | kept per workspace "
        "(rows / KB) | kept for 100k workspaces (GB) |",
        "|---|---|---|---|",
    ]
    for flaps_per_day in (1, 4, 24, 96):
        written_rows = written_bytes = kept_rows = kept_bytes = 0.0
        for table, (rows_per_flap, bytes_per_row) in per_flap.items():
            per_day = rows_per_flap * flaps_per_day
            if table == "workspace_events":
                kept = max(
                    settings.event_keep_per_workspace,
                    per_day * settings.event_retention_s / DAY_S,
                )
            elif table in ("reconciles", "reconcile_steps"):
                runs = max(
                    settings.reconcile_keep_per_workspace,
                    flaps_per_day * settings.reconcile_retention_s / DAY_S,
                )
                kept = runs * rows_per_flap  # steps follow their runs
            else:
                kept = per_day * settings.action_retention_s / DAY_S
            written_rows += per_day
            written_bytes += per_day * bytes_per_row
            kept_rows += kept
            kept_bytes += kept * bytes_per_row
        lines.append(
            f"| {flaps_per_day} | {written_rows:,.0f} / {written_bytes / 1024:,.1f} | "
            f"{kept_rows:,.0f} / {kept_bytes / 1024:,.0f} | "
            f"{kept_bytes * 100_000 / 1e9:,.1f} |"
        )
    return lines


def sizes(args: argparse.Namespace, work_dir: Path) -> None:
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    plugin = work_dir / "plugins" / "tool"
    plugin.mkdir(parents=True)
    (plugin / "main.py").write_text("print('tool')\n")
    env = {
        "REGISTRY_PLUGIN_ALLOWLIST": f"file://{work_dir / 'plugins'}/",
        "REGISTRY_RECONCILE_POLL_S": "0.2",
    }
    process = registry_proc.start(dsn, work_dir, env)
    try:
        process.wait_healthy()
        lines = asyncio.run(_churn(process.url, dsn, plugin, args.workspaces, args.flaps))
    finally:
        process.stop()
    print("\n".join(lines))


# scale

# Skewed as fleets are: a tenth of the events and runs spread over every workspace, the rest
# over a noisy tenth of the fleet, which is where retention has something to delete.
WORKSPACE_OF_G = (
    "md5($1 || ':' || (CASE WHEN g % 10 = 0 THEN 1 + (g / 10) % $2"
    " ELSE 1 + g % ($2 / 10) END)::text)::uuid"
)

SEED_EVENTS = f"""
INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor, seq, at)
SELECT {WORKSPACE_OF_G}, 'status',
       CASE WHEN g % 2 = 0 THEN 'online' ELSE 'offline' END,
       CASE WHEN g % 2 = 0 THEN 'offline' ELSE 'online' END,
       'heartbeat', 'runtime', g,
       now() - make_interval(secs => ($3::bigint - g) * $4::float8)
FROM generate_series($5::bigint, $6::bigint) AS g
"""
SEED_RUNS = f"""
WITH runs AS (
    INSERT INTO reconciles (workspace_id, trigger, status, attempt, created_at, next_attempt_at,
                            started_at, finished_at)
    SELECT {WORKSPACE_OF_G}, 'online_transition', 'succeeded', 1,
           at.t, at.t, at.t, at.t + interval '1 second'
    FROM generate_series($3::bigint, $4::bigint) AS g,
         LATERAL (SELECT now() - make_interval(secs => ($5::bigint - g) * $6::float8)) AS at(t)
    RETURNING id, created_at
)
INSERT INTO reconcile_steps (reconcile_id, attempt, plugin, action, status, source, sha,
                             started_at, finished_at)
SELECT id, 1, 'tool', 'install', 'succeeded', 'file:///srv/plugins/tool', md5(id::text),
       created_at, created_at
FROM runs
"""
CHUNK = 500_000


async def _seed_history(dsn: str, fleet: Fleet, events: int, runs: int, span_s: float) -> None:
    """Events and runs spread evenly over `span_s` back from now, newest last."""
    conn = await asyncpg.connect(dsn)
    try:
        for first in range(1, events + 1, CHUNK):
            last = min(events, first + CHUNK - 1)
            await conn.execute(
                SEED_EVENTS, fleet.salt, fleet.size, events, span_s / events, first, last
            )
            print(f"  events {last:,}/{events:,}", flush=True)
        for first in range(1, runs + 1, CHUNK):
            last = min(runs, first + CHUNK - 1)
            await conn.execute(SEED_RUNS, fleet.salt, fleet.size, first, last, runs, span_s / runs)
            print(f"  runs {last:,}/{runs:,}", flush=True)
        await conn.execute("VACUUM ANALYZE")
        await judge_plugins_sync(conn)
        # The load's writes (and VACUUM's hint bits) flushed now, not by a checkpoint during
        # the measurement: a fleet in service is not minutes after a 10 GB bulk load.
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def _heartbeats(
    url: str, fleet: Fleet, stopped: Callable[[], bool], rate: float
) -> tuple[int, int]:
    """Heartbeats from random workspaces, evenly spaced at `rate` per second (open loop,
    as a fleet's beats are spread over its interval) until `stopped()`; (sent, refused)."""
    sent = refused = 0
    in_flight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> None:
            nonlocal refused
            async with session.post(
                f"{url}/registry/heartbeat",
                data=fleet.heartbeat_body(n),
                headers={
                    "Authorization": f"Bearer {fleet.token(n)}",
                    "Content-Type": "application/json",
                },
            ) as response:
                await response.read()
                refused += response.status >= 300

        start = time.monotonic()
        while not stopped():
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(random.randint(1, fleet.size)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        if in_flight:
            await asyncio.wait(set(in_flight))
    return sent, refused


def _heartbeat_process(url: str, fleet: Fleet, rate: float, stop: EventType, counts: Any) -> None:
    """The heartbeats in a process of their own: sending them from the measuring loop would
    charge the read routes' latencies with the client's own work."""
    counts[0], counts[1] = asyncio.run(_heartbeats(url, fleet, stop.is_set, rate))


async def _latencies(
    session: aiohttp.ClientSession, path_of: Callable[[], str], samples: int
) -> tuple[Latencies, int]:
    timings, errors = [], 0
    for _ in range(samples):
        path = path_of()
        started = time.perf_counter()
        async with session.get(path) as response:
            await response.read()
            if response.status != 200:
                errors += 1
        timings.append(time.perf_counter() - started)
    return Latencies.of(timings), errors


async def _stream_first_frame(url: str, after: int, workspace_id: str | None) -> float:
    """From opening /events with Last-Event-ID to its first event frame."""
    params = {"workspace_id": workspace_id} if workspace_id else {}
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession(headers=ADMIN) as session,
        session.get(
            f"{url}/events", params=params, headers={"Last-Event-ID": str(after)}
        ) as response,
    ):
        async for line in response.content:
            if line.startswith(b"data:"):
                return time.perf_counter() - started
    return float("nan")


def _routes(fleet: Fleet, recent: int, deep_cursor: str) -> list[tuple[str, Callable[[], str]]]:
    ids = [str(fleet.workspace_id(n)) for n in range(1, fleet.size + 1)]

    def some() -> str:
        return random.choice(ids)

    return [
        ("GET /workspaces/{id}", lambda: f"/workspaces/{some()}"),
        ("GET /workspaces/{id}/events", lambda: f"/workspaces/{some()}/events?limit=100"),
        (
            "GET /internal/workspaces/{id}/reconciles",
            lambda: f"/internal/workspaces/{some()}/reconciles",
        ),
        ("GET /events/history (fleet, recent)", lambda: f"/events/history?after={recent}"),
        (
            "GET /events/history?workspace_id",
            lambda: f"/events/history?workspace_id={some()}&limit=100",
        ),
        ("GET /fleet", lambda: "/fleet"),
        ("GET /metrics", lambda: "/metrics"),
        ("GET /workspaces (first page)", lambda: "/workspaces?limit=100"),
        ("GET /workspaces (deep page)", lambda: f"/workspaces?limit=100&cursor={deep_cursor}"),
        ("GET /workspaces?status=failed (rare)", lambda: "/workspaces?status=failed&limit=100"),
    ]


PRUNE_BUDGET_S = 60.0


async def _history_rows(conn: asyncpg.Connection) -> dict[str, int]:
    return {table: rows for table, (rows, _) in (await _table_sizes(conn)).items()}


async def _measure(url: str, dsn: str, fleet: Fleet, events: int, samples: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    deep_cursor = str(
        await conn.fetchval(
            "SELECT id FROM workspaces ORDER BY id OFFSET $1 LIMIT 1", fleet.size * 9 // 10
        )
    )
    recent = events - 50
    lines = [
        f"{fleet.size:,} workspaces, {events:,} events; ~200 heartbeats/s flowing; "
        f"{samples} requests per route, one at a time",
        "",
        "| route | p50 ms | p99 ms | errors | verdict (p99 <= 50 ms) |",
        "|---|---|---|---|---|",
    ]
    load_at_start = os.getloadavg()[0]
    spawn = multiprocessing.get_context("spawn")
    stop, counts = spawn.Event(), spawn.Array("q", 2)
    beats = spawn.Process(target=_heartbeat_process, args=(url, fleet, 200.0, stop, counts))
    beats.start()
    try:
        async with aiohttp.ClientSession(base_url=url, headers=ADMIN) as session:
            for name, path_of in _routes(fleet, recent, deep_cursor):
                await _latencies(session, path_of, 5)  # warm the plan caches
                latency, errors = await _latencies(session, path_of, samples)
                ok = latency.p99_s <= TARGET_P99_S and errors == 0
                lines.append(
                    f"| {name} | {latency.p50_s * 1e3:.2f} | {latency.p99_s * 1e3:.2f} | "
                    f"{errors} | {'ok' if ok else 'MISSED'} |"
                )
        # One that has events (with a small history, a given workspace may have none).
        some_id = str(
            await conn.fetchval(
                "SELECT workspace_id FROM workspace_events ORDER BY id DESC LIMIT 1"
            )
        )
        for name, after, workspace_id in (
            ("GET /events (SSE resume, first frame)", recent, None),
            ("GET /events?workspace_id (SSE, first frame)", 0, some_id),
        ):
            firsts = [await _stream_first_frame(url, after, workspace_id) for _ in range(20)]
            lines.append(
                f"| {name} | {statistics.median(firsts) * 1e3:.2f} | "
                f"{max(firsts) * 1e3:.2f} (max of 20) | 0 | - |"
            )
        # The pruner, with heartbeats still flowing: everything past the 14-day retention,
        # for at most PRUNE_BUDGET_S (a whole pass over millions of rows takes minutes, by
        # design: small batches with pauses).
        policy = RetentionPolicy.from_settings(Settings())
        rows_before = await _history_rows(conn)
        started = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(prune(conn, policy), PRUNE_BUDGET_S)
        elapsed = time.perf_counter() - started
        rows_after = await _history_rows(conn)
        deleted = {table: rows_before[table] - rows_after[table] for table in rows_before}
        total = sum(deleted.values())
        pruned = ", ".join(f"{t} {n:,}" for t, n in deleted.items())
        lines += [
            "",
            f"prune (batch {policy.batch}, pause {policy.pause_s * 1e3:g} ms): {total:,} rows "
            f"in {elapsed:.1f} s = {total / elapsed:,.0f} rows/s ({pruned})",
        ]
    finally:
        stop.set()
        await asyncio.to_thread(beats.join)
        await conn.close()
    lines.append(f"heartbeats sent meanwhile: {counts[0]:,}, refused: {counts[1]:,}")
    load_at_end = os.getloadavg()[0]
    lines.append(
        f"load average (1 min) at the start and the end: {load_at_start:.2f}, {load_at_end:.2f}"
    )
    return lines


def scale(args: argparse.Namespace, work_dir: Path) -> None:
    fleet = Fleet.new(args.workspaces)
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    # The schema first: a registry process applies the migrations.
    process = registry_proc.start(dsn, work_dir, {"REGISTRY_PRUNE_INTERVAL_S": "86400"})
    process.wait_healthy()
    process.stop()
    started = time.monotonic()
    asyncio.run(seed(dsn, fleet, status="online", heartbeat_age_s=1.0))
    # 20 days of history: the oldest 30% is past the 14-day retention.
    asyncio.run(_seed_history(dsn, fleet, args.events, args.runs, 20 * DAY_S))
    print(f"seeded in {time.monotonic() - started:.0f} s", flush=True)
    env = {
        "REGISTRY_PRUNE_INTERVAL_S": "86400",  # the bench runs the pruner itself
        # Seeded heartbeats are a second old: nobody expires during the run.
        "REGISTRY_OFFLINE_AFTER_S": "3600",
    }
    process = registry_proc.start(dsn, work_dir, env)
    try:
        process.wait_healthy(within_s=120)
        lines = asyncio.run(_measure(process.url, dsn, fleet, args.events, args.samples))
    finally:
        process.stop()
    print("\n".join(lines))


# tombstones

QUIET_SWEEP = SweepPolicy(
    offline_after_s=3600,
    provision_timeout_s=3600,
    mass_expiry_share=0.5,
    mass_expiry_min_fleet=10,
    mass_expiry_rate=0.1,
)


async def _sweep_times(dsn: str, rounds: int) -> list[float]:
    """Sweeps over a fleet where nobody is stale: what every 5-s sweep costs."""
    conn = await asyncpg.connect(dsn)
    try:
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            await sweep(conn, QUIET_SWEEP)
            timings.append(time.perf_counter() - started)
        return timings
    finally:
        await conn.close()


async def _fleet_routes(url: str, samples: int) -> dict[str, Latencies]:
    async with aiohttp.ClientSession(base_url=url, headers=ADMIN) as session:
        measured = {}
        for path in ("/fleet", "/metrics", "/workspaces?limit=100"):
            path_of = functools.partial(str, path)
            await _latencies(session, path_of, 3)
            measured[path], _ = await _latencies(session, path_of, samples)
        return measured


# The hot statements, each with arguments as its callers give them: how many shared buffers
# (pages) an execution touches does not depend on how loaded the machine is, so it says
# whether tombstones are read at all where a timing on a shared machine cannot.
HOT_STATEMENTS: tuple[tuple[str, str, tuple[object, ...]], ...] = (
    ("/fleet counts", fleet_db.STATUS_COUNTS, ()),
    ("/metrics fleet gauges", fleet_counts.FLEET_COUNTS, ()),
    ("list page", workspaces.SELECT_LIVE_PAGE, (workspaces.FIRST_ID, 100)),
    ("sweep: count silent", transitions.COUNT_SILENT, (LIVE_STATUSES, 3600.0, 0.0, 0.0, None)),
    (
        "sweep: expire silent",
        transitions.EXPIRE_SILENT,
        (LIVE_STATUSES, 3600.0, 1000, "offline", "bench", 0.0, 0.0, None),
    ),
)


async def _buffers(dsn: str) -> dict[str, int]:
    """Shared buffers each hot statement touches (hit or read), its plan warmed first."""
    conn = await asyncpg.connect(dsn)
    try:
        touched = {}
        for name, sql, args in HOT_STATEMENTS:
            undone = conn.transaction()  # EXPLAIN ANALYZE runs it: whatever it writes is undone
            await undone.start()
            try:
                await conn.fetch(sql, *args)
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            finally:
                await undone.rollback()
            top = json.loads(plan)[0]["Plan"]
            touched[f"{name} (buffers)"] = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
        return touched
    finally:
        await conn.close()


def _tombstone_phase(dsn: str, work_dir: Path, samples: int) -> dict[str, float]:
    env = {"REGISTRY_METRICS_CACHE_S": "0", "REGISTRY_OFFLINE_AFTER_S": "3600"}
    process = registry_proc.start(dsn, work_dir, env)
    try:
        process.wait_healthy(within_s=120)
        routes = asyncio.run(_fleet_routes(process.url, samples))
    finally:
        process.stop()
    figures = {path: latency.p50_s for path, latency in routes.items()}
    figures["sweep"] = statistics.median(asyncio.run(_sweep_times(dsn, samples)))
    return {**figures, **asyncio.run(_buffers(dsn))}


def tombstones(args: argparse.Namespace, work_dir: Path) -> None:
    """/fleet, /metrics, a list page and a sweep with N live workspaces, then with 10 N
    tombstones beside them: removed workspaces must cost the hot paths nothing."""
    live, removed = Fleet.new(args.workspaces), Fleet.new(args.workspaces * 10)
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    process = registry_proc.start(dsn, work_dir, {})  # the schema first
    process.wait_healthy()
    process.stop()
    asyncio.run(seed(dsn, live, status="online", heartbeat_age_s=1.0))
    alone = _tombstone_phase(dsn, work_dir, args.samples)
    asyncio.run(seed(dsn, removed, status="removed", heartbeat_age_s=86400.0))
    beside = _tombstone_phase(dsn, work_dir, args.samples)
    print(
        f"{live.size:,} live workspaces alone, then beside {removed.size:,} removed ones "
        f"(p50 of {args.samples}; target: within 20%)\n"
    )
    print("| | live alone (ms, or buffers) | with tombstones | ratio |")
    print("|---|---|---|---|")
    for name in alone:
        ratio = beside[name] / alone[name] if alone[name] else float("nan")
        scale = 1 if name.endswith("(buffers)") else 1e3
        print(
            f"| {name} | {alone[name] * scale:,.2f} | {beside[name] * scale:,.2f} | {ratio:.2f} "
            f"{'ok' if ratio <= 1.2 else 'MISSED'} |"
        )


# double-write

INSERT_UNSEQUENCED = """
INSERT INTO workspace_events (workspace_id, kind, cause, actor)
SELECT gen_random_uuid(), 'status', 'bench', 'bench' FROM generate_series(1, $1)
"""
INSERT_SEQUENCED = """
INSERT INTO workspace_events (workspace_id, kind, cause, actor, seq)
SELECT gen_random_uuid(), 'status', 'bench', 'bench',
       (SELECT COALESCE(max(seq), 0) FROM workspace_events) + g
FROM generate_series(1, $1) AS g
"""


async def _wal_of(conn: asyncpg.Connection, *statements: tuple[str, int]) -> tuple[int, float]:
    """WAL bytes and seconds the statements took, each in its own transaction."""
    await conn.execute("CHECKPOINT")
    start = await conn.fetchval("SELECT pg_current_wal_lsn()")
    started = time.perf_counter()
    for sql, arg in statements:
        await conn.execute(sql, arg)
    elapsed = time.perf_counter() - started
    wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", start)
    return int(wal), elapsed


def double_write(args: argparse.Namespace, work_dir: Path) -> None:
    """What numbering events after their insert costs (the sequencer's UPDATE, which makes
    resume-after-id safe against late commits) against an insert that numbers at once."""
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    process = registry_proc.start(dsn, work_dir, {})  # the schema first
    process.wait_healthy()
    process.stop()
    n, batch = args.events, 1000

    async def run() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            # Batches of 1,000, as the sequencer numbers them.
            twice = [(INSERT_UNSEQUENCED, batch), (SEQUENCE_PENDING, batch)] * (n // batch)
            once = [(INSERT_SEQUENCED, batch)] * (n // batch)
            wal_twice, s_twice = await _wal_of(conn, *twice)
            wal_once, s_once = await _wal_of(conn, *once)
        finally:
            await conn.close()
        return [
            f"{n:,} events in batches of {batch}:",
            f"  insert + sequence update: {wal_twice / n:,.0f} B of WAL per event, "
            f"{s_twice / n * 1e6:,.1f} µs per event",
            f"  numbered at insert:       {wal_once / n:,.0f} B of WAL per event, "
            f"{s_once / n * 1e6:,.1f} µs per event",
            f"  ratio: WAL {wal_twice / wal_once:.2f}x, time {s_twice / s_once:.2f}x",
        ]

    print("\n".join(asyncio.run(run())))


RUNS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "sizes": sizes,
    "scale": scale,
    "tombstones": tombstones,
    "double-write": double_write,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.history", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("run", choices=tuple(RUNS))
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN, help="a server DSN (any database)")
    parser.add_argument("--database", default="bench_history", help="created and dropped")
    parser.add_argument("--workspaces", type=int, help="default: 200 (sizes), 100000 (scale)")
    parser.add_argument("--flaps", type=int, default=10, help="sizes: flaps per workspace")
    parser.add_argument("--events", type=int, default=10_000_000, help="scale: event rows")
    parser.add_argument("--runs", type=int, default=2_000_000, help="scale: finished runs")
    parser.add_argument("--samples", type=int, default=200, help="scale: requests per route")
    parser.add_argument(
        "--keep-database", action="store_true", help="leave it for EXPLAIN (drop it yourself)"
    )
    args = parser.parse_args(argv)
    if args.workspaces is None:
        args.workspaces = 200 if args.run == "sizes" else 100_000
    if args.run == "double-write" and args.events == parser.get_default("events"):
        args.events = 1_000_000
    db.check_name(args.database)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-history-{args.run}-") as tmp:
            RUNS[args.run](args, Path(tmp))
    finally:
        if not args.keep_database:
            asyncio.run(db.drop(args.dsn, args.database))


if __name__ == "__main__":
    main()
