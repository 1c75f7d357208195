"""The heartbeat benchmark: pgbench's single-statement limit, then the registry's real
POST /registry/heartbeat, coalesced and per request, in one run on one seeded fleet.

    .venv/bin/python -m bench.heartbeat [--workspaces 10000] [--connections 64]
        [--duration 10] [--processes 1|2] [--generator auto|wrk|python]

CPU columns are cores used on average over each measured window (2.00 = both cores busy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import db, generators, pgbench, registry_proc, wrk
from bench.fleet import Fleet, seed
from bench.report import Row, markdown, verdict

# Targets from the issue, for the verdict lines (never asserted: the machine is shared).
TARGET_RATIO = 0.75
TARGET_P99_S = 0.015
TARGET_VS_PER_REQUEST = 1.5


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


def measure_registry(
    options: Options,
    dsn: str,
    fleet: Fleet,
    work_dir: Path,
    env: dict[str, str],
    pg_options: tuple[str, ...],
) -> generators.Measurement:
    registry_dsn = db.with_options(dsn, pg_options)
    procs = registry_proc.start_many(registry_dsn, work_dir, env, options.processes)
    pids = [p.pid for p in procs]
    urls = [p.url for p in procs]
    try:
        # Each phase starts from a clean checkpoint, so no phase pays for another's WAL.
        asyncio.run(db.execute(dsn, "CHECKPOINT"))
        if options.generator == "wrk":
            script = wrk.write_script(work_dir, work_dir / "fleet.txt")
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
        )
        return generators.measure_python([process], pids)
    finally:
        for proc in procs:
            proc.stop()


def _phases(options: Options, dsn: str, fleet: Fleet, work_dir: Path) -> dict[str, object]:
    rows: list[Row] = []
    asyncio.run(db.execute(dsn, "CHECKPOINT"))
    limit = pgbench.run(
        options.pgbench,
        dsn,
        fleet,
        clients=options.connections,
        duration_s=max(1, round(options.duration_s)),
        work_dir=work_dir,
    )
    rows.append(
        Row("pgbench single statement", limit.tps, limit.latencies, limit.errors, limit.cpu)
    )
    base_env = {"REGISTRY_OFFLINE_AFTER_S": "3600"}
    modes: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
        ("registry coalesced", {**base_env, "REGISTRY_HEARTBEAT_COALESCE": "true"}, ()),
        ("registry per-request", {**base_env, "REGISTRY_HEARTBEAT_COALESCE": "false"}, ()),
    ]
    if options.pg_options:
        # The same two modes with the lever, in the same run, so the rows compare.
        modes += [(f"{name} + pg options", env, options.pg_options) for name, env, _ in modes]
    measured: dict[str, generators.Measurement] = {}
    for name, env, pg_options in modes:
        m = measure_registry(options, dsn, fleet, work_dir, env, pg_options)
        measured[name] = m
        note = " ".join((f"{options.processes} proc, {options.generator}", *pg_options))
        rows.append(Row(name, m.rate, m.latencies, m.errors, m.cpu, note))
    coalesced = measured["registry coalesced"]
    per_request = measured["registry per-request"]
    ratio = coalesced.rate / limit.tps
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
    print(f"registry (coalesced) / pgbench = {ratio:.2f}  (target >= {TARGET_RATIO})")
    print(f"coalesced / per-request        = {vs_per_request:.2f}  (target >= 1.5)")
    for target, ok in summary["targets"].items():  # type: ignore[attr-defined]
        print(f"  {target}: {verdict(ok)}")
    return {
        "workspaces": options.workspaces,
        "connections": options.connections,
        "duration_s": options.duration_s,
        "processes": options.processes,
        "generator": options.generator,
        "rows": [asdict(row) for row in rows],
        **summary,
    }


def run(options: Options) -> dict[str, object]:
    fleet = Fleet.new(options.workspaces)
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        work_dir = Path(tmp)
        dsn = asyncio.run(db.recreate(options.server_dsn, options.database))
        try:
            asyncio.run(seed_fleet(dsn, fleet))
            fleet.write_file(work_dir / "fleet.txt")
            return _phases(options, dsn, fleet, work_dir)
        finally:
            if not options.keep_database:
                asyncio.run(db.drop(options.server_dsn, options.database))


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
    )


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    result = run(options)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
