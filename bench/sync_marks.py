"""What the plugins_sync marks (migration 0016's triggers) cost a heartbeat, interleaved.

    .venv/bin/python -m bench.sync_marks [--workspaces 10000] [--batch 100] [--rounds 20]

The registry's heartbeat statement as it is, on one seeded fleet and one connection, in
rounds alternating the triggers that mark changed workspaces on and off (so noise hits both
alike): first beats that report what they reported before (the common case: the WHEN clause
is false, nothing runs), then beats whose report changes every round (each beat marks its
workspace once).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics

import asyncpg

from bench import db
from bench.fleet import Fleet, seed
from bench.statement_ab import beats
from registry.db.heartbeats import apply_beats

# migrations/0016_stored_plugins_sync.sql (and 0019 for the report)
TRIGGERS = {
    "reported_plugins": ("reported_plugins_sync",),  # migration 0019 moved it here
    "reconciles": ("reconciles_sync_new", "reconciles_sync_changed"),
    "workspace_actions": ("workspace_actions_sync_new", "workspace_actions_sync_acked"),
}


async def set_marks(conn: asyncpg.Connection, on: bool) -> None:
    verb = "ENABLE" if on else "DISABLE"
    for table, names in TRIGGERS.items():
        for name in names:
            await conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {name}")


async def timed_round(
    conn: asyncpg.Connection, fleet: Fleet, args: argparse.Namespace, uptime: float, sha: str
) -> float:
    """Seconds per beat over the round's batches spread across the fleet."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(args.batches_per_round):
        start = 1 + (i * args.batch) % max(1, fleet.size - args.batch)
        batch = [
            dataclasses.replace(b, observed_plugins=[{"name": "a", "sha": sha}])
            for b in beats(fleet, start, args.batch, uptime)
        ]
        await apply_beats(conn, batch)
    beats_n: int = args.batch * args.batches_per_round
    return (loop.time() - started) / beats_n


async def compare(
    conn: asyncpg.Connection, fleet: Fleet, args: argparse.Namespace, changing: bool
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"marks on": [], "marks off": []}
    uptime = 3600.0
    for round_ in range(args.rounds + 1):
        order = [True, False] if round_ % 2 == 0 else [False, True]
        for on in order:
            await set_marks(conn, on)
            uptime += 1.0  # uptime only grows: no beat looks like a restart
            sha = f"sha-{round_}-{on}" if changing else "same"
            seconds = await timed_round(conn, fleet, args, uptime, sha)
            if round_ > 0:  # round 0 warms both up (and sets the unchanging report)
                figures["marks on" if on else "marks off"].append(seconds)
    await set_marks(conn, True)
    return figures


def report(title: str, figures: dict[str, list[float]]) -> None:
    on, off = (statistics.median(figures[k]) for k in ("marks on", "marks off"))
    print(f"\n{title}")
    for name, values in figures.items():
        print(
            f"  {name:<10} median {statistics.median(values) * 1e6:7.1f} us/beat "
            f"(min {min(values) * 1e6:.1f}, max {max(values) * 1e6:.1f})"
        )
    print(f"  on / off (median time per beat) = {on / off:.3f}")


async def run(args: argparse.Namespace) -> None:
    fleet = Fleet.new(args.workspaces)
    dsn = await db.recreate(args.dsn, args.database)
    try:
        await seed(dsn, fleet, status="online", heartbeat_age_s=1.0)
        conn = await asyncpg.connect(dsn)
        try:
            seeded = await conn.fetchval("SELECT count(*) FROM plugins_sync_dirty")
            same = await compare(conn, fleet, args, changing=False)
            marks = await conn.fetchval("SELECT count(*) FROM plugins_sync_dirty") - seeded
            changing = await compare(conn, fleet, args, changing=True)
        finally:
            await conn.close()
    finally:
        await db.drop(args.dsn, args.database)
    beats_n = args.batch * args.batches_per_round
    report(f"reports unchanged ({beats_n} beats a round, {args.rounds} rounds)", same)
    print(f"  marks written meanwhile (round 0 changed every report once): {marks}")
    report("reports changed every round (one mark per beat)", changing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_marks", description=__doc__)
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN)
    parser.add_argument("--database", default="bench_sync_marks")
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="beats per statement")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batches-per-round", type=int, default=20)
    args = parser.parse_args(argv)
    db.check_name(args.database)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
