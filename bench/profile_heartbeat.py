"""Where one heartbeat's registry CPU goes, and what the event loop lever buys.

    .venv/bin/python -m bench.profile_heartbeat [--workspaces 10000] [--connections 64]
        [--duration 10] [--rounds 2] [--skip-profile] [--skip-ab]

Profile: one `registry serve` (coalesced) under wrk against the seeded fleet, sampled from
outside by py-spy (`pip install py-spy`; no overhead inside the process, and only the measured
window: no start-up) at 250 Hz; each sample's innermost Python frame goes into one bucket (HTTP
parsing, middlewares, auth hash, ...), so the buckets add up to the process's busy samples.
A C call is counted in the Python frame that made it (a socket send in asyncio's transport,
sha256 in hash_token). µs per beat = the bucket's share x the registry CPU per beat measured
in the same window (/proc utime+stime ÷ beats answered).

A/B: `REGISTRY_EVENT_LOOP=asyncio` against `uvloop`, alternating in --rounds rounds, each a
fresh process: beats/s, p99 and registry CPU µs per beat.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import db, generators, registry_proc, wrk
from bench.fleet import Fleet, seed

BASE_ENV = {"REGISTRY_OFFLINE_AFTER_S": "3600", "REGISTRY_HEARTBEAT_COALESCE": "true"}
SAMPLE_HZ = 250

# (bucket, needles in "path:function" of the innermost frame); the first that matches wins.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("auth hash (sha256 of the token)", ("registry/auth.py:hash_token",)),
    ("JSON (orjson, json responses)", ("orjson", "registry/jsonio.py")),
    ("metrics (prometheus_client, http metrics)", ("prometheus_client", "http_metrics.py")),
    (
        "middlewares (request id, errors, admission, auth, query)",
        (
            "registry/logs.py",
            "registry/errors.py",
            "registry/admission.py",
            "registry/auth.py",
            "registry/query.py",
            "aiohttp/web_middlewares.py",
        ),
    ),
    (
        "validation + handler",
        (
            "registry/handlers/",
            "registry/validation.py",
            "registry/body.py",
            "registry/tolerance.py",
            "registry/refusals.py",
            "uuid.py",
        ),
    ),
    ("ingest + asyncpg", ("registry/ingest.py", "registry/db/", "asyncpg/")),
    (
        "HTTP parsing + connection (aiohttp protocol)",
        (
            "aiohttp/web_protocol.py",
            "aiohttp/http_parser.py",
            "aiohttp/base_protocol.py",
            "aiohttp/streams.py",
            "registry/protocol.py",
        ),
    ),
    ("HTTP request/response objects, routing (aiohttp)", ("aiohttp/",)),
    ("event loop + socket I/O (asyncio)", ("asyncio/", "selectors.py")),
]


def bucket_of(label: str) -> str:
    for name, needles in BUCKETS:
        if any(needle in label for needle in needles):
            return name
    return "other"


def _leaf(stack: str) -> str:
    """py-spy's raw frame `function (path:line)` as `path:function`."""
    frame = stack.rsplit(";", 1)[-1]
    function, _, where = frame.rpartition(" (")
    return f"{where.rsplit(':', 1)[0]}:{function}"


def breakdown(raw: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Samples per bucket, and per innermost frame, from py-spy's raw (collapsed) output."""
    buckets: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = _leaf(stack)
        buckets[bucket_of(leaf)] = buckets.get(bucket_of(leaf), 0) + int(count)
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
    return buckets, leaves


def run_wrk(
    url: str, pid: int, script: Path, connections: int, duration_s: float
) -> generators.Measurement:
    wrk.run_many([f"{url}/registry/heartbeat"], script, connections, 2.0)  # warm-up
    return generators.measure_wrk(
        [f"{url}/registry/heartbeat"], [pid], script, connections, duration_s
    )


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: `.venv/bin/pip install py-spy`")
    return found


def profile(args: argparse.Namespace, dsn: str, work_dir: Path, script: Path) -> None:
    raw = work_dir / "serve.raw"
    proc = registry_proc.start(dsn, work_dir, BASE_ENV)
    try:
        proc.wait_healthy()
        url = f"{proc.url}/registry/heartbeat"
        wrk.run_many([url], script, args.connections, 2.0)  # warm-up
        sampler = subprocess.Popen(
            [
                *(py_spy(), "record", "--pid", str(proc.pid), "--rate", str(SAMPLE_HZ)),
                *("--duration", str(round(args.duration)), "--format", "raw"),
                *("--output", str(raw), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        m = generators.measure_wrk([url], [proc.pid], script, args.connections, args.duration)
        sampler.wait(60)
    finally:
        proc.stop()
    per_beat = m.cpu.registry * 1e6 / m.rate
    buckets, leaves = breakdown(raw)
    total = sum(buckets.values())
    print(
        f"profiled window: {m.rate:,.0f} beats/s, p99 {m.latencies.p99_s * 1e3:.2f} ms, "
        f"registry {m.cpu.registry:.2f} cores = {per_beat:.1f} µs/beat; {total:,} samples "
        f"(postgres {m.cpu.postgres:.2f}, wrk {m.cpu.loadgen:.2f}, other {m.cpu.other:.2f} cores)"
    )
    print(f"{'bucket':<58} {'share':>6} {'µs/beat':>8}")
    for name, count in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"{name:<58} {count / total:>6.1%} {count / total * per_beat:>8.1f}")
    print("top innermost frames:")
    for leaf, count in sorted(leaves.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {count / total:>6.1%}  {leaf[-90:]}")
    if args.keep_profile:
        Path(args.keep_profile).write_text(raw.read_text())


def ab(args: argparse.Namespace, dsn: str, work_dir: Path, script: Path) -> None:
    sides = {"asyncio": {}, "uvloop": {"REGISTRY_EVENT_LOOP": "uvloop"}}
    figures: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides.items()) if round_ % 2 == 0 else list(sides.items())[::-1]
        for name, env in order:
            proc = registry_proc.start(dsn, work_dir, {**BASE_ENV, **env})
            try:
                proc.wait_healthy()
                asyncio.run(db.execute(dsn, "CHECKPOINT"))
                m = run_wrk(proc.url, proc.pid, script, args.connections, args.duration)
            finally:
                proc.stop()
            per_beat = m.cpu.registry * 1e6 / m.rate if m.rate else float("nan")
            figures[name].append((m.rate, m.latencies.p99_s * 1e3, per_beat, m.errors))
            print(
                f"round {round_ + 1} {name:<8} {m.rate:>9,.0f} beats/s  "
                f"p99 {m.latencies.p99_s * 1e3:6.2f} ms  registry {m.cpu.registry:.2f} cores = "
                f"{per_beat:6.1f} µs/beat  errors {m.errors}  (postgres {m.cpu.postgres:.2f}, "
                f"wrk {m.cpu.loadgen:.2f}, other {m.cpu.other:.2f})"
            )
    for name, rows in figures.items():
        print(
            f"{name:<8} median: {statistics.median(r[0] for r in rows):>9,.0f} beats/s, "
            f"p99 {statistics.median(r[1] for r in rows):.2f} ms, "
            f"{statistics.median(r[2] for r in rows):.1f} µs/beat"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_heartbeat", description=__doc__)
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN)
    parser.add_argument("--database", default="bench_profile")
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-ab", action="store_true")
    parser.add_argument("--keep-profile", default=None, metavar="FILE", help="py-spy raw output")
    parser.add_argument("--top", type=int, default=25, help="innermost frames listed")
    args = parser.parse_args(argv)
    if not wrk.available():
        parser.error(wrk.INSTALL_HINT)
    fleet = Fleet.new(args.workspaces)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work_dir = Path(tmp)
        dsn = asyncio.run(db.recreate(args.dsn, db.check_name(args.database)))
        try:
            asyncio.run(seed(dsn, fleet, status="online", heartbeat_age_s=1.0))
            script = wrk.write_script(work_dir, fleet, fleet.write_file(work_dir / "fleet.txt"))
            if not args.skip_profile:
                profile(args, dsn, work_dir, script)
            if not args.skip_ab:
                ab(args, dsn, work_dir, script)
        finally:
            asyncio.run(db.drop(args.dsn, args.database))


if __name__ == "__main__":
    main()
