"""The heartbeat benchmark: pgbench's single-statement limit, then the registry's real
POST /registry/heartbeat, coalesced and per request, in one run on one seeded fleet.

    .venv/bin/python -m bench.heartbeat [--fleet synthetic|api] [--workspaces 10000]
        [--connections 64] [--duration 10] [--processes 1|2] [--workers 1,2]
        [--generator auto|wrk|python] [--constant-bodies] [--pgbench-lookup] [--explain]

--fleet synthetic (the default) inserts the fleet in one SQL statement and analyses it;
--fleet api makes it through the API as operators do and lets its reconciles run and drain
first (bench/api_fleet.py), then measures the same phases, plus one on the registry process
that made the fleet. Bodies vary as a runtime's do (uptime growing, tasks changing) unless
--constant-bodies.

--workers 1,2 measures the coalesced mode once per count, each as one `registry serve
--workers N` on one port. pgbench runs before and after the registry phases; the limit is the
mean of the two.

CPU columns are cores used on average over each measured window (2.00 = both cores busy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from bench import api_fleet, db, generators, pgbench, registry_proc, state, wrk
from bench.fleet import Fleet, record_mapping, seed
from bench.report import Row, markdown, verdict

# Targets from the issue, for the verdict lines (never asserted: the machine is shared).
TARGET_RATIO = 0.75
TARGET_P99_S = 0.015
TARGET_VS_PER_REQUEST = 1.5
# `<id> <token> <plugins>` per workspace (Fleet.write_file), in the run's directory.
FLEET_FILE = "fleet.txt"


@dataclass(frozen=True, slots=True)
class Options:
    server_dsn: str
    database: str
    workspaces: int
    connections: int
    duration_s: float
    warmup_s: float
    processes: int
    generator: str  # wrk or python
    pgbench: str
    keep_database: bool
    json_path: Path | None
    # PostgreSQL settings for the registry's connections in two extra phases (asyncpg passes
    # unknown DSN query parameters as server settings): measures a lever without editing
    # registry/.
    pg_options: tuple[str, ...] = ()
    workers: tuple[int, ...] = (1,)
    fleet: str = "synthetic"  # or api
    constant_bodies: bool = False
    # Synthetic fleet: also measure pgbench addressing rows through the mapping table.
    pgbench_lookup: bool = False
    explain: bool = False
    seed_connections: int = 16


@dataclass(frozen=True, slots=True)
class Writes:
    """Rows written during a phase besides the beats themselves: a steady fleet writes none
    (an event or a run here means a beat looked like a restart or a change)."""

    events: int
    runs: int

    def __str__(self) -> str:
        return f"{self.events} events, {self.runs} runs"


async def _marks(dsn: str) -> tuple[int, object]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT COALESCE(max(id), 0) FROM workspace_events) AS event, now() AS at"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["event"]), row["at"]


async def _writes_since(dsn: str, marks: tuple[int, object]) -> Writes:
    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetchval(
            "SELECT count(*) FROM workspace_events WHERE id > $1", marks[0]
        )
        runs = await conn.fetchval(
            "SELECT count(*) FROM reconciles WHERE created_at >= $1", marks[1]
        )
    finally:
        await conn.close()
    return Writes(int(events), int(runs))


def measure_registry(
    options: Options,
    dsn: str,
    fleet: Fleet,
    work_dir: Path,
    env: dict[str, str],
    pg_options: tuple[str, ...],
    workers: int = 1,
) -> tuple[generators.Measurement, float, Writes]:
    """The measurement on registries started for it, the cluster's WAL bytes per beat over it
    (warm-up included), and what else was written meanwhile."""
    registry_dsn = db.with_options(dsn, pg_options)
    if workers > 1:
        procs = registry_proc.start_many(
            registry_dsn, work_dir, {**env, "REGISTRY_WORKERS": str(workers)}, 1
        )
        pids = registry_proc.worker_pids(procs[0].url, workers)
    else:
        procs = registry_proc.start_many(registry_dsn, work_dir, env, options.processes)
        pids = [p.pid for p in procs]
    try:
        return measure_on(options, dsn, fleet, work_dir, [p.url for p in procs], pids)
    finally:
        for proc in procs:
            proc.stop()


def measure_on(
    options: Options, dsn: str, fleet: Fleet, work_dir: Path, urls: list[str], pids: list[int]
) -> tuple[generators.Measurement, float, Writes]:
    """One measurement on running registries (see measure_registry)."""
    # Each phase starts from a clean checkpoint, so no phase pays for another's WAL.
    asyncio.run(db.execute(dsn, "CHECKPOINT"))
    before = asyncio.run(db.wal_lsn(dsn))
    marks = asyncio.run(_marks(dsn))
    measured = _measure(options, fleet, work_dir, urls, pids)
    wal = asyncio.run(db.wal_lsn(dsn)) - before
    writes = asyncio.run(_writes_since(dsn, marks))
    beats = measured.rate * (measured.wall_s + options.warmup_s)
    return measured, wal / beats if beats else float("nan"), writes


def _measure(
    options: Options, fleet: Fleet, work_dir: Path, urls: list[str], pids: list[int]
) -> generators.Measurement:
    if options.generator == "wrk":
        script = wrk.write_script(
            work_dir, fleet, work_dir / FLEET_FILE, constant=options.constant_bodies
        )
        # wrk has no warm-up of its own: a short unmeasured run opens the pools and
        # prepares the statements.
        wrk.run_many(
            [f"{u}/registry/heartbeat" for u in urls],
            script,
            options.connections,
            options.warmup_s,
        )
        return generators.measure_wrk(
            [f"{u}/registry/heartbeat" for u in urls],
            pids,
            script,
            options.connections,
            options.duration_s,
        )
    process = generators.spawn_python(
        urls,
        fleet,
        connections=options.connections,
        duration_s=options.duration_s,
        warmup_s=options.warmup_s,
        fleet_file=work_dir / FLEET_FILE,
        constant_bodies=options.constant_bodies,
    )
    return generators.measure_python([process], pids)


def _pgbench(
    options: Options, dsn: str, fleet: Fleet, work_dir: Path, *, lookup: bool
) -> pgbench.PgbenchResult:
    """pgbench's single-statement limit, from a clean checkpoint like every phase."""
    asyncio.run(db.execute(dsn, "CHECKPOINT"))
    return pgbench.run(
        options.pgbench,
        dsn,
        fleet,
        clients=options.connections,
        duration_s=max(1, round(options.duration_s)),
        work_dir=work_dir,
        lookup=lookup,
        constant=options.constant_bodies,
    )


def _pgbench_row(name: str, result: pgbench.PgbenchResult, lookup: bool) -> Row:
    note = "rows by bench_fleet lookup" if lookup else "rows by md5/sha256 of n"
    return Row(name, result.tps, result.latencies, result.errors, result.cpu, note)


def _phases(
    options: Options,
    dsn: str,
    fleet: Fleet,
    work_dir: Path,
    fleet_env: dict[str, str],
    maker: registry_proc.RegistryProcess | None = None,
) -> dict[str, object]:
    """The measured phases. `fleet_env`: settings every registry serving this fleet needs;
    `maker`: the running registry that made the fleet, measured too (coalesced)."""
    fleet.write_file(work_dir / FLEET_FILE)
    print(f"fleet: {options.fleet}, {fleet.size:,} workspaces; tables before the phases:")
    print(asyncio.run(state.tables(dsn)))
    if options.explain:
        print(asyncio.run(state.heartbeat_plans(dsn, fleet)))
    rows: list[Row] = []
    # A recorded fleet's rows can only be found through the mapping table.
    lookup = fleet.is_recorded
    base_env = {**fleet_env, "REGISTRY_OFFLINE_AFTER_S": "3600"}
    coalesced_env = {**base_env, "REGISTRY_HEARTBEAT_COALESCE": "true"}
    shape = f"1 proc, {options.generator}"
    measured: dict[str, generators.Measurement] = {}
    # First, and stopped before pgbench: its pools and background loops would otherwise take
    # connections and CPU from the pgbench phase.
    if maker is not None:
        name = "registry coalesced, the process that made the fleet"
        try:
            m, wal_per_beat, writes = measure_on(
                options, dsn, fleet, work_dir, [maker.url], [maker.pid]
            )
        finally:
            maker.stop()
        measured[name] = m
        rows.append(
            Row(name, m.rate, m.latencies, m.errors, m.cpu, f"{shape}; {writes}", wal_per_beat)
        )
    limit = _pgbench(options, dsn, fleet, work_dir, lookup=lookup)
    rows.append(_pgbench_row("pgbench single statement", limit, lookup))
    if options.pgbench_lookup and not lookup:
        other = _pgbench(options, dsn, fleet, work_dir, lookup=True)
        rows.append(_pgbench_row("pgbench single statement, by lookup", other, True))
    modes: list[tuple[str, dict[str, str], tuple[str, ...], int]] = [
        ("registry coalesced", coalesced_env, (), 1),
        ("registry per-request", {**base_env, "REGISTRY_HEARTBEAT_COALESCE": "false"}, (), 1),
    ]
    modes += [
        (f"registry coalesced, {n} workers", coalesced_env, (), n) for n in options.workers if n > 1
    ]
    if options.pg_options:
        # The same two modes with the lever, in the same run, so the rows compare.
        modes += [
            (f"{name} + pg options", env, options.pg_options, 1) for name, env, _, _ in modes[:2]
        ]
    for name, env, pg_options, workers in modes:
        m, wal_per_beat, writes = measure_registry(
            options, dsn, fleet, work_dir, env, pg_options, workers
        )
        measured[name] = m
        shape = f"{workers} workers" if workers > 1 else f"{options.processes} proc"
        note = " ".join((f"{shape}, {options.generator}", *pg_options)) + f"; {writes}"
        rows.append(Row(name, m.rate, m.latencies, m.errors, m.cpu, note, wal_per_beat))
    after = _pgbench(options, dsn, fleet, work_dir, lookup=lookup)
    rows.append(_pgbench_row("pgbench single statement, after", after, lookup))
    limit_tps = (limit.tps + after.tps) / 2
    coalesced = measured["registry coalesced"]
    per_request = measured["registry per-request"]
    ratio = coalesced.rate / limit_tps
    vs_per_request = coalesced.rate / per_request.rate if per_request.rate else float("inf")
    summary = {
        "ratio_registry_to_pgbench": ratio,
        "coalesced_to_per_request": vs_per_request,
        "targets": {
            "ratio >= 0.75": ratio >= TARGET_RATIO,
            "p99 <= 15 ms": coalesced.latencies.p99_s <= TARGET_P99_S,
            "zero errors": coalesced.errors == 0,
            ">= 1.5x per-request": vs_per_request >= TARGET_VS_PER_REQUEST,
        },
    }
    print(markdown(rows))
    print()
    print(f"pgbench limit = mean of before and after = {limit_tps:,.0f}/s")
    print(f"registry (coalesced) / pgbench = {ratio:.2f}  (target >= {TARGET_RATIO})")
    for name, m in measured.items():
        if "workers" in name or "made the fleet" in name:
            to_one = m.rate / coalesced.rate
            print(f"{name} / pgbench = {m.rate / limit_tps:.2f}; / fresh 1 worker = {to_one:.2f}")
    print(f"coalesced / per-request        = {vs_per_request:.2f}  (target >= 1.5)")
    for target, ok in summary["targets"].items():  # type: ignore[attr-defined]
        print(f"  {target}: {verdict(ok)}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("tables after the phases:")
    print(asyncio.run(state.tables(dsn)))
    return {
        "fleet": options.fleet,
        "constant_bodies": options.constant_bodies,
        "workspaces": options.workspaces,
        "connections": options.connections,
        "duration_s": options.duration_s,
        "processes": options.processes,
        "generator": options.generator,
        "load_average": os.getloadavg(),
        "rows": [asdict(row) for row in rows],
        **summary,
    }


def run(options: Options) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        work_dir = Path(tmp)
        dsn = asyncio.run(db.recreate(options.server_dsn, options.database))
        try:
            if options.fleet == "api":
                return _api_run(options, dsn, work_dir)
            fleet = Fleet.new(options.workspaces)
            asyncio.run(seed_fleet(dsn, fleet))
            if options.pgbench_lookup:
                asyncio.run(record_mapping(dsn, fleet))
            return _phases(options, dsn, fleet, work_dir, {})
        finally:
            if not options.keep_database:
                asyncio.run(db.drop(options.server_dsn, options.database))


def _api_run(options: Options, dsn: str, work_dir: Path) -> dict[str, object]:
    """The fleet made through the API by a registry that then stays up to be measured too."""
    fleet_env = api_fleet.registry_env(work_dir)
    builder_env = {**fleet_env, **api_fleet.BUILDER_ENV, "REGISTRY_HEARTBEAT_COALESCE": "true"}
    [maker] = registry_proc.start_many(dsn, work_dir, builder_env, 1)
    try:
        fleet = asyncio.run(
            api_fleet.build(
                maker.url, dsn, work_dir, options.workspaces, connections=options.seed_connections
            )
        )
        asyncio.run(record_mapping(dsn, fleet))
        return _phases(options, dsn, fleet, work_dir, fleet_env, maker)
    finally:
        maker.stop()


async def seed_fleet(dsn: str, fleet: Fleet) -> None:
    # Online with a fresh heartbeat: every measured beat is the steady state (no transition).
    await seed(dsn, fleet, status="online", heartbeat_age_s=1.0)


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heartbeat", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN, help="a server DSN (any database)")
    parser.add_argument("--database", default="bench_heartbeat", help="created and dropped")
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--workers",
        type=lambda raw: tuple(int(n) for n in raw.split(",")),
        default=(1,),
        help="also measure coalesced with `serve --workers N` for each N > 1, e.g. 1,2",
    )
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--pgbench", default=None, help="pgbench binary (default: pgserver's)")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument(
        "--pg-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also measure both modes with this PostgreSQL setting on the registry's "
        "connections, e.g. plan_cache_mode=force_generic_plan",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--fleet",
        choices=("synthetic", "api"),
        default="synthetic",
        help="synthetic: inserted by one SQL statement; api: made through the API as operators "
        "do, its reconciles drained before measuring",
    )
    parser.add_argument(
        "--seed-connections", type=int, default=16, help="api fleet: requests at once to make it"
    )
    parser.add_argument(
        "--constant-bodies",
        action="store_true",
        help="the same body every beat (uptime 3600, 1 task) instead of varying ones",
    )
    parser.add_argument(
        "--pgbench-lookup",
        action="store_true",
        help="synthetic fleet: also run pgbench finding rows through the bench_fleet table "
        "(as it must for the api fleet)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print EXPLAIN (ANALYZE, BUFFERS) of one batch of 100 beats before the phases",
    )
    args = parser.parse_args(argv)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if wrk.available() else "python"
        if generator == "python":
            print(f"{wrk.INSTALL_HINT}; using the Python load generator", file=sys.stderr)
    elif generator == "wrk" and not wrk.available():
        parser.error(wrk.INSTALL_HINT)
    return Options(
        server_dsn=args.dsn,
        database=db.check_name(args.database),
        workspaces=args.workspaces,
        connections=args.connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
        processes=args.processes,
        generator=generator,
        pgbench=pgbench.find_pgbench(args.pgbench),
        keep_database=args.keep_database,
        json_path=args.json,
        pg_options=tuple(args.pg_option),
        workers=args.workers,
        fleet=args.fleet,
        constant_bodies=args.constant_bodies,
        pgbench_lookup=args.pgbench_lookup,
        explain=args.explain,
        seed_connections=args.seed_connections,
    )


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    result = run(options)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
