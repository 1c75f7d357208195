"""WAL bytes per heartbeat by the size of the reported plugin list, now against a revision.

    .venv/bin/python -m bench.wal [--rev fada760] [--plugins 0,20,500] [--workspaces 1000]
        [--rounds 6] [--batch 100] [--dsn DSN]

The runtimes report the same plugin list every beat (what a steady fleet does) with a growing
uptime. Each round applies one beat to every workspace, through the heartbeat statement of each
side in turn (alternating who goes first), on one connection, and reads the WAL written from
`pg_current_wal_lsn()`. Each side has a database of its own in one cluster, migrated to its
own revision (the schema its statement knew). That position is the cluster's, so by default
the bench runs on an embedded PostgreSQL of its own (the `pgserver` wheel) where nothing else
writes; with --dsn other sessions' WAL is counted too. The first round of each size is not
counted (it stores the list; afterwards it is unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from bench import db
from bench.fleet import Fleet
from bench.statement_ab import ApplyBeats, beats, sides_at
from registry.embedded_pg import start_embedded_postgres


def plugin_list(count: int) -> list[dict[str, str]]:
    """As runtimes report them: a name and a commit sha each (shas do not compress)."""
    return [
        {"name": f"plugin-{i:03d}", "sha": hashlib.sha1(f"p{i}".encode()).hexdigest()}  # noqa: S324
        for i in range(count)
    ]


async def wal_lsn(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return int(value)


async def one_round(
    conn: asyncpg.Connection,
    apply: ApplyBeats,
    fleet: Fleet,
    batch: int,
    uptime: float,
    plugins: Any,
) -> float:
    """WAL bytes per beat for one beat to every workspace."""
    before = await wal_lsn(conn)
    for start in range(1, fleet.size + 1, batch):
        await apply(conn, beats(fleet, start, batch, uptime, plugins))
    return (await wal_lsn(conn) - before) / fleet.size


async def measure(server_dsn: str, args: argparse.Namespace) -> dict[tuple[int, str], list[float]]:
    """Each side on a database of its own, migrated to its own revision, in one cluster."""
    fleet = Fleet.new(args.workspaces)
    figures: dict[tuple[int, str], list[float]] = {}
    async with sides_at(server_dsn, args.database, args.rev, fleet, args.setup_sql) as sides:
        uptime = 3600.0
        for count in args.plugins:
            plugins = plugin_list(count)
            for round_ in range(args.rounds + 1):
                order = list(sides.items()) if round_ % 2 == 0 else list(sides.items())[::-1]
                for name, (apply, conn) in order:
                    uptime += 1.0
                    per_beat = await one_round(conn, apply, fleet, args.batch, uptime, plugins)
                    if round_ > 0:
                        figures.setdefault((count, name), []).append(per_beat)
    return figures


async def run(args: argparse.Namespace) -> None:
    if args.dsn:
        figures = await measure(args.dsn, args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-wal-") as tmp:
            dsn, server = await asyncio.to_thread(
                start_embedded_postgres, Path(tmp) / "pg", keep_data=False
            )
            try:
                figures = await measure(dsn, args)
            finally:
                await asyncio.to_thread(server.cleanup)  # stops it, deletes its data
    print(f"{'plugins':>7}  {'side':<14} {'median WAL B/beat':>18} {'min':>9} {'max':>9}")
    for (count, name), values in figures.items():
        print(
            f"{count:>7}  {name:<14} {statistics.median(values):>18,.0f} "
            f"{min(values):>9,.0f} {max(values):>9,.0f}"
        )
    for count in args.plugins:
        base = statistics.median(figures[(count, f"at {args.rev}")])
        new = statistics.median(figures[(count, "now")])
        print(f"{count} plugins: now / at {args.rev} = {new / base:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wal", description=__doc__)
    parser.add_argument("--dsn", default=None, help="a server DSN (default: embedded PostgreSQL)")
    parser.add_argument("--database", default="bench_wal")
    parser.add_argument("--rev", default="fada760", help="the revision to compare with")
    parser.add_argument("--workspaces", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--plugins", type=lambda s: [int(x) for x in s.split(",")], default=[0, 20, 500]
    )
    parser.add_argument(
        "--setup-sql", action="append", default=[], help="run after seeding (try a lever)"
    )
    args = parser.parse_args(argv)
    db.check_name(args.database)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
