"""The heartbeat statement now against the one of an earlier revision, interleaved in one run.

    .venv/bin/python -m bench.statement_ab [--rev fada760] [--workspaces 10000]
        [--batch 100] [--rounds 20] [--batches-per-round 20]

A/B over HTTP on this shared 2-core machine swings by 2x between runs; this compares only
what the database does per beat (the part a protocol change touches), alternating old and
new statement in rounds, the same seeded fleet on each side, so noise hits both alike. Each
side has a database of its own on the server, migrated to its own revision (the schema its
statement knew: migration 0019 moved a column the statements before it write). The old
module is loaded from `git show <rev>:registry/db/heartbeats.py`; it must keep
`apply_beats(conn, beats)` and the `Beat` fields of today.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench import db
from bench.fleet import Fleet, seed
from registry.auth import hash_token
from registry.db import heartbeats as current
from registry.db.heartbeats import Beat
from registry.db.migrate import Migration, load_migrations
from registry.statuses import Health

ApplyBeats = Callable[[asyncpg.Connection, list[Beat]], Awaitable[list[Any]]]


def module_at(rev: str) -> types.ModuleType:
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:registry/db/heartbeats.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"heartbeats_at_{rev}")
    # dataclasses look their module up in sys.modules; a fresh name there is enough.
    sys.modules[module.__name__] = module
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102
    return module


TWO_PLUGINS = [{"name": "a", "sha": "1" * 40}, {"name": "b", "sha": "2" * 40}]


def beat(fleet: Fleet, n: int, uptime: float, plugins: list[dict[str, str]] | None) -> Beat:
    """Workspace n's steady-state beat, as a real runtime sends it."""
    return Beat(
        workspace_id=fleet.workspace_id(n),
        token_hash=hash_token(fleet.token(n)),
        health=Health.HEALTHY,
        error_rate=0.0,
        sample_error="",
        active_tasks=n % 3,
        uptime_seconds=uptime,
        current_task="",
        monthly_spend=1.5,
        runtime_state="ok",
        observed_plugins=plugins,
        acks=[],
    )


def beats(
    fleet: Fleet,
    start: int,
    count: int,
    uptime: float,
    plugins: list[dict[str, str]] | None = TWO_PLUGINS,
) -> list[Beat]:
    """Steady-state beats: growing uptime, the same plugins (two unless told), to workspaces
    `start` on, never past the fleet's last."""
    return [
        beat(fleet, n, uptime, plugins) for n in range(start, min(start + count, fleet.size + 1))
    ]


async def timed_round(
    conn: asyncpg.Connection,
    apply: ApplyBeats,
    fleet: Fleet,
    batch: int,
    batches: int,
    uptime: float,
) -> float:
    """Seconds per beat over `batches` batches spread across the fleet."""
    started = time.perf_counter()
    for i in range(batches):
        start = 1 + (i * batch) % max(1, fleet.size - batch)
        await apply(conn, beats(fleet, start, batch, uptime))
    return (time.perf_counter() - started) / (batch * batches)


def migrations_at(rev: str) -> list[Migration]:
    """The schema of another revision, so its statement runs against the tables it knew."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-migrations-") as tmp:
        archive = subprocess.run(
            ["git", "archive", rev, "migrations"], cwd=root, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        return load_migrations(Path(tmp) / "migrations")


Side = tuple[ApplyBeats, asyncpg.Connection]


@contextlib.asynccontextmanager
async def sides_at(
    server_dsn: str, database: str, rev: str, fleet: Fleet, setup_sql: Sequence[str] = ()
) -> AsyncIterator[dict[str, Side]]:
    """The statement at `rev` and now, each with a connection to a database of its own
    (`<database>_rev`, `<database>_now`) migrated to its revision and seeded with `fleet`;
    both databases are dropped afterwards."""
    names = {f"at {rev}": f"{database}_rev", "now": f"{database}_now"}
    sides: dict[str, Side] = {}
    try:
        for (name, database_name), apply, migrations in zip(
            names.items(),
            (module_at(rev).apply_beats, current.apply_beats),
            (migrations_at(rev), None),
            strict=True,
        ):
            dsn = await db.recreate(server_dsn, database_name, migrations)
            await seed(dsn, fleet, status="online", heartbeat_age_s=1.0)
            for statement in setup_sql:
                await db.execute(dsn, statement)
            sides[name] = (apply, await asyncpg.connect(dsn))
        yield sides
    finally:
        for _, conn in sides.values():
            await conn.close()
        for database_name in names.values():
            await db.drop(server_dsn, database_name)


async def run(args: argparse.Namespace) -> None:
    fleet = Fleet.new(args.workspaces)
    async with sides_at(args.dsn, args.database, args.rev, fleet) as sides:
        figures: dict[str, list[float]] = {name: [] for name in sides}
        uptime = 3600.0
        for round_ in range(args.rounds + 1):
            # Alternate which side goes first, so neither always meets a warmer cache.
            order = list(sides.items()) if round_ % 2 == 0 else list(sides.items())[::-1]
            for name, (apply, conn) in order:
                uptime += 1.0  # uptime only grows: no beat looks like a restart
                seconds = await timed_round(
                    conn, apply, fleet, args.batch, args.batches_per_round, uptime
                )
                if round_ > 0:  # round 0 warms both up
                    figures[name].append(seconds)
    base, new = (statistics.median(v) for v in figures.values())
    print(f"{'statement':<16} {'median us/beat':>15} {'min':>8} {'max':>8}")
    for name, values in figures.items():
        print(
            f"{name:<16} {statistics.median(values) * 1e6:>15.1f} "
            f"{min(values) * 1e6:>8.1f} {max(values) * 1e6:>8.1f}"
        )
    print(f"now / at {args.rev} (median time per beat) = {new / base:.3f}")
    wins = sum(n < b for n, b in zip(figures["now"], figures[f"at {args.rev}"], strict=True))
    print(f"rounds where now was faster: {wins} of {args.rounds}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.statement_ab", description=__doc__)
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN)
    parser.add_argument("--database", default="bench_statement_ab")
    parser.add_argument("--rev", default="fada760", help="the revision to compare with")
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="beats per statement")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batches-per-round", type=int, default=20)
    args = parser.parse_args(argv)
    db.check_name(args.database)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
