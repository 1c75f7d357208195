"""The event stream against heartbeats: heartbeat p99 with 0 and with N SSE subscribers to
GET /events while events are written at a steady rate, their delivery delay, and what idle
subscribers cost the database.

    .venv/bin/python -m bench.event_stream [--workspaces 1000] [--subscribers 500]
        [--heartbeat-rate 200] [--event-rate 100] [--duration 20] [--idle 15] [--rounds 3]
        [--profile FILE]   # py-spy (when installed) on the registry, loaded with subscribers
        [--compare]        # A/B within one run: no subscribers, writer tasks, direct writes
        [--modes direct,separate,paced]   # separate: streams from a 2nd process; paced:
        [--writes-per-s 500]              # direct writes within that budget

One registry process (`registry serve`). Events are inserted by this driver, one committed
row each at --event-rate (what status flips and reconcile outcomes write; the stream cannot
tell them apart), and the registry's sequencer numbers them as in production. Heartbeats are
an open loop (bench/loadgen.py): latency counted from the scheduled send. Subscribers run in a
process of their own (bench/sse_clients.py). Database work is PostgreSQL's own count of
transactions in the bench database (pg_stat_database.xact_commit; every statement the
registry runs outside a transaction is one), per second of an idle window.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson

from bench import cpu, db, generators, registry_proc, server_metrics
from bench.fleet import Fleet, seed
from bench.report import Row, markdown, verdict
from bench.stats import Latencies

TARGET_P99_RATIO = 1.10  # 500 subscribers add at most 10% to heartbeat p99

INSERT_EVENT = """
INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor)
VALUES ($1, 'status', 'online', 'degraded', 'bench', 'bench')
"""

XACTS = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
# The backends serving the bench database: their CPU is what the registry costs PostgreSQL
# (the machine's other servers are not counted).
BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"


@dataclass(frozen=True, slots=True)
class Load:
    measurement: generators.Measurement
    events: int
    # The registry's own histogram of the window (cumulative (bound s, count)): a tail seen
    # by the generator but not here was spent before the handler (the loop, the CPU).
    server_buckets: list[tuple[float, float]]
    subscribers_cores: float = 0.0  # the subscriber process, which shares the machine

    def server_p99_bound_s(self) -> float:
        total = self.server_buckets[-1][1] if self.server_buckets else 0.0
        for bound, count in self.server_buckets:
            if total and count >= 0.99 * total:
                return bound
        return float("nan")


@dataclass(frozen=True, slots=True)
class Idle:
    xacts_per_s: float
    registry_cores: float
    postgres_cores: float


def insert_events(dsn: str, fleet: Fleet, rate: float, duration_s: float) -> list[int]:
    """In a thread of its own: one committed event per 1/rate s, on schedule; the count."""
    inserted = [0]

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            k = 0
            while (due := start + k / rate) < start + duration_s:
                await asyncio.sleep(max(0.0, due - loop.time()))
                await conn.execute(INSERT_EVENT, fleet.workspace_id(random.randint(1, fleet.size)))
                inserted[0] += 1
                k += 1
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return inserted


def heartbeats_with_events(
    args: argparse.Namespace, proc: registry_proc.RegistryProcess, fleet: Fleet, dsn: str
) -> Load:
    generator = generators.spawn_python(
        [proc.url],
        fleet,
        connections=args.connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rate=args.heartbeat_rate,
    )
    before = server_metrics.heartbeat_buckets(proc.url)
    # Events from the start of the warm-up to the end of the window.
    inserted = insert_events(dsn, fleet, args.event_rate, args.warmup + args.duration + 0.2)
    m = generators.measure_python([generator], [proc.pid])
    after = server_metrics.heartbeat_buckets(proc.url)
    window = [(b, n - dict(before).get(b, 0.0)) for b, n in after]
    return Load(m, inserted[0], window)


async def _xacts(dsn: str, database: str) -> tuple[int, list[int]]:
    conn = await asyncpg.connect(dsn)
    try:
        pids = [row["pid"] for row in await conn.fetch(BACKENDS, database)]
        return int(await conn.fetchval(XACTS, database)), pids
    finally:
        await conn.close()


def _backends_cpu_s(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu.process_cpu_s(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
    return found


def idle_window(args: argparse.Namespace, proc: registry_proc.RegistryProcess, dsn: str) -> Idle:
    """No heartbeats, no events: what the registry costs by itself (and its subscribers).
    PostgreSQL reports a backend's counts at most once a second, and those of a backend that
    then went idle only 10 s later: the window starts after a settle longer than that."""
    time.sleep(args.settle)
    before, pids = asyncio.run(_xacts(dsn, args.database))
    counted_from = time.monotonic()
    registry_start, backends_start = cpu.process_cpu_s(proc.pid), _backends_cpu_s(pids)
    time.sleep(args.idle)
    wall = time.monotonic() - counted_from
    registry_end, backends_end = cpu.process_cpu_s(proc.pid), _backends_cpu_s(pids)
    after, _ = asyncio.run(_xacts(dsn, args.database))
    counted_s = time.monotonic() - counted_from
    postgres_s = sum(
        backends_end[p] - backends_start[p] for p in backends_end if p in backends_start
    )
    # Our own count query is a transaction in this database too.
    return Idle(
        (after - before - 1) / counted_s, (registry_end - registry_start) / wall, postgres_s / wall
    )


class Subscribers:
    """bench/sse_clients.py in a child process."""

    def __init__(self, args: argparse.Namespace, url: str, fleet: Fleet) -> None:
        filtered = round(args.subscribers * args.filtered_share)
        # In production subscribers are other machines; here they share the two cores, and
        # --subscriber-nice keeps their wake-ups from preempting the registry's sends.
        command = [
            *(["nice", "-n", str(args.subscriber_nice)] if args.subscriber_nice else []),
            sys.executable,
            "-m",
            "bench.sse_clients",
            f"--url={url}",
            f"--token={registry_proc.ADMIN_TOKEN}",
            f"--subscribers={args.subscribers}",
            f"--filtered={filtered}",
            f"--probes={min(args.probes, args.subscribers - filtered)}",
            *(f"--filter-id={fleet.workspace_id(n)}" for n in range(1, min(filtered, 50) + 1)),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.process.kill()
            raise RuntimeError(f"subscribers said {line!r} instead of ready")

    def finish(self) -> dict[str, object]:
        output, _ = self.process.communicate(b"stop\n", timeout=120)
        if self.process.returncode != 0:
            raise RuntimeError(f"subscribers failed ({self.process.returncode}): {output!r}")
        result: dict[str, object] = orjson.loads(output.strip().splitlines()[-1])
        return result


def _profile(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy (when asked for, and installed) over the loaded window with subscribers:
    collapsed stacks, one line per stack with its sample count."""
    if args.profile is None:
        return None
    seconds = str(round(args.warmup + args.duration))
    command = ["py-spy", "record", "-p", str(pid), "-d", seconds, "-r", "200"]
    return subprocess.Popen([*command, "--format", "raw", "-o", str(args.profile)])


# --compare: the two ways of writing to subscribers (REGISTRY_EVENT_DIRECT_WRITES), unpaced;
# "separate": direct writes from a second registry process that serves the streams, so the
# heartbeats' process has no subscribers (a deployment choice, README "Running several
# registry processes"); "paced": direct writes within --writes-per-s subscriber writes a
# second (REGISTRY_EVENT_WRITES_PER_S).
MODES = {
    "writers": {"REGISTRY_EVENT_DIRECT_WRITES": "false", "REGISTRY_EVENT_WRITES_PER_S": "0"},
    "direct": {"REGISTRY_EVENT_DIRECT_WRITES": "true", "REGISTRY_EVENT_WRITES_PER_S": "0"},
    "separate": {"REGISTRY_EVENT_DIRECT_WRITES": "true", "REGISTRY_EVENT_WRITES_PER_S": "0"},
    "paced": {"REGISTRY_EVENT_DIRECT_WRITES": "true"},
}


@dataclass(frozen=True, slots=True)
class Window:
    mode: str  # "none" (no subscribers) or one of MODES
    load: Load
    received: dict[str, object] | None
    # Registry cores while only events are written (no heartbeats), before the loaded window:
    # what fanning them out costs, in CPU time, which the machine's load disturbs far less
    # than it does latency.
    events_only_cores: float
    events_only_events: int

    @property
    def p99_s(self) -> float:
        return self.load.measurement.latencies.p99_s

    def delays(self) -> Latencies | None:
        if self.received is None:
            return None
        return Latencies.of(d / 1e3 for d in self.received["delays_ms"])  # type: ignore[attr-defined]

    def fewest_frames(self) -> int:
        """What the unfiltered subscriber that got the least received."""
        frames: list[int] = (self.received or {}).get("frames_unfiltered", [])  # type: ignore[assignment]
        return min(frames, default=0)


def _seeded(args: argparse.Namespace) -> tuple[Fleet, str, dict[str, str]]:
    """A fresh database with the fleet online, and the registry's settings for the bench:
    nobody goes offline, and room for every subscriber."""
    fleet = Fleet.new(args.workspaces)
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    asyncio.run(seed(dsn, fleet, status="online", heartbeat_age_s=1.0))
    env = {
        "REGISTRY_OFFLINE_AFTER_S": "3600",
        "REGISTRY_EVENT_MAX_SUBSCRIBERS": str(args.subscribers + 10),
    }
    return fleet, dsn, env


def compare(args: argparse.Namespace, work_dir: Path) -> bool:
    """Rounds of three loaded windows, their order rotated each round (the machine's load
    drifts): no subscribers, subscribers with writer tasks, with direct writes. One registry
    process at a time, started for its window: two would each run a sequencer, numbering
    events twice as often in smaller pages than one process does."""
    fleet, dsn, env = _seeded(args)
    windows: list[list[Window]] = []
    order = ["none", *args.modes]
    for r in range(args.rounds):
        windows.append([])
        for mode in _rotated(order, r):
            mode_env = {**MODES.get(mode, MODES["direct"])}
            mode_env.setdefault("REGISTRY_EVENT_WRITES_PER_S", f"{args.writes_per_s:g}")
            procs = registry_proc.start_many(
                dsn, work_dir, {**env, **mode_env}, 2 if mode == "separate" else 1
            )
            try:
                windows[-1].append(_window(args, procs[0], fleet, dsn, mode, procs[-1]))
            finally:
                for proc in procs:
                    proc.stop()
    return report_compare(args, windows)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"modes are of: {', '.join(MODES)}")
    return modes


def _rotated(order: list[str], by: int) -> list[str]:
    k = by % len(order)
    return order[k:] + order[:k]


def _window(
    args: argparse.Namespace,
    proc: registry_proc.RegistryProcess,
    fleet: Fleet,
    dsn: str,
    mode: str,
    streams: registry_proc.RegistryProcess,
) -> Window:
    """Heartbeats to `proc`; the subscribers (if any) to `streams`, which may be `proc`."""
    if mode == "none":
        fan_out = _events_only_cores(args, proc, fleet, dsn)
        return Window(mode, heartbeats_with_events(args, proc, fleet, dsn), None, *fan_out)
    subscribers = Subscribers(args, streams.url, fleet)
    try:
        fan_out = _events_only_cores(args, proc, fleet, dsn)
        load = heartbeats_with_events(args, proc, fleet, dsn)
        time.sleep(args.drain)  # what is still on its way to the subscribers
    finally:
        received = subscribers.finish()
    return Window(mode, load, received, *fan_out)


def _events_only_cores(
    args: argparse.Namespace, proc: registry_proc.RegistryProcess, fleet: Fleet, dsn: str
) -> tuple[float, int]:
    """Registry cores while only events are written, and how many were."""
    inserted = insert_events(dsn, fleet, args.event_rate, args.events_only)
    start, used = time.monotonic(), cpu.process_cpu_s(proc.pid)
    time.sleep(args.events_only)
    cores = (cpu.process_cpu_s(proc.pid) - used) / (time.monotonic() - start)
    time.sleep(0.5)  # the inserting thread's last commit
    return cores, inserted[0]


def report_compare(args: argparse.Namespace, rounds: list[list[Window]]) -> bool:
    ratios: dict[str, list[float]] = {mode: [] for mode in args.modes}
    print(
        f"{args.subscribers} subscribers, {args.heartbeat_rate:g} beats/s, "
        f"{args.event_rate:g} events/s, {args.duration:g} s windows"
    )
    for i, windows in enumerate(rounds, 1):
        by_mode = {w.mode: w for w in windows}
        base = by_mode["none"].p99_s
        parts = [
            f"round {i} ({' '.join(w.mode for w in windows)}): p99 none {base * 1e3:.1f} ms "
            f"(events only: registry {by_mode['none'].events_only_cores:.3f} cores)"
        ]
        for mode in args.modes:
            w = by_mode[mode]
            ratios[mode].append(w.p99_s / base)
            delays = w.delays()
            assert delays is not None and w.received is not None
            parts.append(
                f"{mode} {w.p99_s * 1e3:.1f} ms (x{w.p99_s / base:.2f}; events only: registry "
                f"{w.events_only_cores:.3f} cores; loaded: registry "
                f"{w.load.measurement.cpu.registry:.2f} cores; delay p50 "
                f"{delays.p50_s * 1e3:.0f} / p99 {delays.p99_s * 1e3:.0f} ms; "
                f"{w.received['dropped']} dropped, received "
                f"{w.fewest_frames()}/{w.load.events + w.events_only_events})"
            )
        print("; ".join(parts))
    for mode in ["none", *args.modes]:
        cores = statistics.median(
            w.events_only_cores for ws in rounds for w in ws if w.mode == mode
        )
        print(f"{mode}: events only, registry cores, median {cores:.3f}")
    for mode in args.modes:
        mode_delays = [w.delays() for ws in rounds for w in ws if w.mode == mode]
        p50 = statistics.median(d.p50_s for d in mode_delays if d is not None)
        p99 = statistics.median(d.p99_s for d in mode_delays if d is not None)
        print(
            f"{mode}: delivery delay, median over rounds: "
            f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms"
        )
    for mode in args.modes:
        median = statistics.median(ratios[mode])
        met = median <= TARGET_P99_RATIO
        print(f"{mode}: median p99 ratio over {len(rounds)} rounds {median:.2f}: {verdict(met)}")
    return min(statistics.median(r) for r in ratios.values()) <= TARGET_P99_RATIO


def _row(name: str, load: Load, note: str) -> Row:
    m = load.measurement
    return Row(name, m.rate, m.latencies, m.errors, m.cpu, note)


def run(args: argparse.Namespace, work_dir: Path) -> bool:
    fleet, dsn, env = _seeded(args)
    [proc] = registry_proc.start_many(dsn, work_dir, env, 1)
    # Both idle windows before any load, whose late-reported counts would land in them; the
    # loaded window with subscribers first, then the same without them.
    try:
        idle_without = idle_window(args, proc, dsn)
        subscribers = Subscribers(args, proc.url, fleet)
        try:
            idle_with = idle_window(args, proc, dsn)
            profiler = _profile(args, proc.pid)
            used = cpu.process_cpu_s(subscribers.process.pid)
            loaded = heartbeats_with_events(args, proc, fleet, dsn)
            used = cpu.process_cpu_s(subscribers.process.pid) - used
            with_subs = Load(
                loaded.measurement,
                loaded.events,
                loaded.server_buckets,
                used / loaded.measurement.wall_s,
            )
            if profiler is not None:
                profiler.wait()
            time.sleep(args.drain)  # what is still on its way to the subscribers
        finally:
            received = subscribers.finish()
        without = heartbeats_with_events(args, proc, fleet, dsn)
        pairs = [(without, with_subs)]
        for _ in range(args.rounds - 1):
            pairs.append(_round(args, proc, fleet, dsn))
    finally:
        proc.stop()
    ok = report(args, idle_without, idle_with, without, with_subs, received)
    if len(pairs) > 1:
        ok = report_rounds(args, pairs)
    return ok


def _round(
    args: argparse.Namespace, proc: registry_proc.RegistryProcess, fleet: Fleet, dsn: str
) -> tuple[Load, Load]:
    """One more pair of loaded windows, with the subscribers and then without them: on a
    shared machine one pair's ratio is mostly noise, the median of several less so."""
    subscribers = Subscribers(args, proc.url, fleet)
    try:
        with_subs = heartbeats_with_events(args, proc, fleet, dsn)
    finally:
        subscribers.finish()
    return heartbeats_with_events(args, proc, fleet, dsn), with_subs


def report_rounds(args: argparse.Namespace, pairs: list[tuple[Load, Load]]) -> bool:
    ratios = []
    print()
    for i, (without, with_subs) in enumerate(pairs, 1):
        p0 = without.measurement.latencies.p99_s
        p1 = with_subs.measurement.latencies.p99_s
        ratios.append(p1 / p0)
        print(
            f"round {i}: heartbeat p99 {p0 * 1e3:.2f} ms with 0, {p1 * 1e3:.2f} ms with "
            f"{args.subscribers}; ratio {p1 / p0:.2f}"
        )
    median = statistics.median(ratios)
    ok = median <= TARGET_P99_RATIO
    print(f"median ratio over {len(pairs)} rounds: {median:.2f}: {verdict(ok)}")
    return ok


def report(
    args: argparse.Namespace,
    idle_without: Idle,
    idle_with: Idle,
    without: Load,
    with_subs: Load,
    received: dict[str, object],
) -> bool:
    n = args.subscribers
    note = f"{args.heartbeat_rate:g} beats/s open loop, {args.event_rate:g} events/s"
    print(
        markdown(
            [
                _row("heartbeats, 0 subscribers", without, note),
                _row(f"heartbeats, {n} subscribers", with_subs, note),
            ]
        )
    )
    p99_without = without.measurement.latencies.p99_s
    p99_with = with_subs.measurement.latencies.p99_s
    ratio = p99_with / p99_without
    print()
    print(
        "server-side heartbeat p99 (registry histogram, bucket bound): "
        f"{without.server_p99_bound_s() * 1e3:g} ms with 0, "
        f"{with_subs.server_p99_bound_s() * 1e3:g} ms with {n}"
    )
    print(f"the subscriber process used {with_subs.subscribers_cores:.2f} cores meanwhile")
    print(f"heartbeat p99: {p99_without * 1e3:.2f} ms with 0 subscribers, ", end="")
    print(f"{p99_with * 1e3:.2f} ms with {n}; ratio {ratio:.2f} (target <= {TARGET_P99_RATIO})")
    delays = Latencies.of(d / 1e3 for d in received["delays_ms"])  # type: ignore[attr-defined]
    print(
        f"event delivery delay (commit -> subscriber, {delays.count} timed): "
        f"p50 {delays.p50_s * 1e3:.1f} ms, p99 {delays.p99_s * 1e3:.1f} ms, "
        f"max {delays.max_s * 1e3:.1f} ms"
    )
    frames: list[int] = received["frames_unfiltered"]  # type: ignore[assignment]
    total = with_subs.events
    behind = [total - f for f in frames]
    print(
        f"subscribers: {received['connected']} connected, {received['refused']} refused, "
        f"{received['dropped']} dropped; {total} events written while they listened; "
        f"unfiltered subscribers received {min(frames, default=0)}..{max(frames, default=0)} "
        f"(most behind at the end: {max(behind, default=0)})"
    )
    print(
        f"idle, database transactions/s: {idle_without.xacts_per_s:.1f} with 0 subscribers, "
        f"{idle_with.xacts_per_s:.1f} with {n} (the registry's own loops; "
        f"difference {idle_with.xacts_per_s - idle_without.xacts_per_s:+.1f}/s)"
    )
    print(
        f"idle, cores: registry {idle_without.registry_cores:.3f} -> "
        f"{idle_with.registry_cores:.3f}, PostgreSQL {idle_without.postgres_cores:.3f} -> "
        f"{idle_with.postgres_cores:.3f} (PostgreSQL: the backends of the bench database)"
    )
    ok = ratio <= TARGET_P99_RATIO
    print(f"  {n} subscribers add <= 10% to heartbeat p99: {verdict(ok)}")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.event_stream", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN, help="a server DSN (any database)")
    parser.add_argument("--database", default="bench_event_stream", help="created and dropped")
    parser.add_argument("--workspaces", type=int, default=1000)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--filtered-share", type=float, default=0.1, help="watch one workspace")
    parser.add_argument("--probes", type=int, default=10, help="subscribers that time events")
    parser.add_argument("--heartbeat-rate", type=float, default=200.0, help="beats/s")
    parser.add_argument("--event-rate", type=float, default=100.0, help="events/s")
    parser.add_argument("--connections", type=int, default=64, help="heartbeat connections")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--idle", type=float, default=15.0, help="idle window, seconds")
    parser.add_argument("--settle", type=float, default=11.0, help="before idle windows")
    parser.add_argument("--drain", type=float, default=3.0, help="after the loaded window")
    parser.add_argument("--subscriber-nice", type=int, default=0, help="nice the subscribers")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of loaded windows")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw output here")
    parser.add_argument("--compare", action="store_true", help="no subscribers, then --modes")
    parser.add_argument(
        "--modes",
        type=_modes,
        default=("writers", "direct"),
        help=f"--compare: comma-separated, of {', '.join(MODES)} (default writers,direct)",
    )
    parser.add_argument("--events-only", type=float, default=10.0, help="--compare: seconds")
    parser.add_argument(
        "--writes-per-s", type=float, default=500.0, help="--compare: the paced mode's budget"
    )
    args = parser.parse_args(argv)
    db.check_name(args.database)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-event-stream-") as tmp:
            (compare if args.compare else run)(args, Path(tmp))
    finally:
        asyncio.run(db.drop(args.dsn, args.database))


if __name__ == "__main__":
    main()
