"""Python load generator for POST /registry/heartbeat, run as its own process.

Two modes:
- closed loop (default): `--connections` workers, each sending its next beat when the
  previous one returned — what wrk does; the fallback when wrk is not installed.
- open loop (`--rate`): beats are sent on a fixed schedule whatever the responses, and each
  latency is measured from the *scheduled* send time, so a stalled server is charged for the
  beats it delayed (no coordinated omission). This is how a fleet on a 30 s interval behaves.

Bodies vary as a runtime's do (bench/fleet.py `varying_body`: uptime growing with the clock,
tasks and error rate changing) unless --constant-bodies; a recorded fleet (--fleet-file) also
reports its plugins. In the closed loop one workspace is never in flight twice at once (see
`Requests.random`); in the open loop its next beat is a whole pass over the fleet later.

Protocol with the parent: a line `measure-start` and a line `measure-end` on stdout mark the
measured window (the parent samples CPU at each), then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import cpu
from bench.fleet import SYNTHETIC_UPTIME_BASE, Fleet
from bench.stats import Latencies

# Socket-level failures, counted apart from non-2xx answers (wrk's split).
SOCKET_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass(slots=True)
class Counts:
    ok: int = 0
    status_errors: int = 0
    socket_errors: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


class Requests:
    """Headers built once, bodies per beat (varying) or once (constant): the generator
    should spend its CPU on sockets."""

    def __init__(
        self, fleet: Fleet, first: int, last: int, urls: list[str], *, constant: bool = False
    ) -> None:
        self._urls = urls
        self._fleet = fleet
        self._constant = constant
        self._items = [
            (
                n,
                fleet.heartbeat_body(n) if constant else b"",
                {"Authorization": f"Bearer {fleet.token(n)}", "Content-Type": "application/json"},
            )
            for n in range(first, last + 1)
        ]

    def _request(self, url: str, index: int) -> Request:
        n, body, headers = self._items[index]
        return Request(url, body if self._constant else self._fleet.varying_body(n), headers)

    def workers(self, connections: int) -> int:
        """Closed loop: one worker per connection, but no more than workspaces (each owns
        some: see `random`)."""
        return min(connections, len(self._items))

    def random(self, worker: int, workers: int) -> Request:
        # Each worker beats only its own workspaces (every workers-th), so one workspace is
        # never in flight twice, as with a real runtime: two varying beats straddling a second
        # could land out of order, an uptime going down (a restart, to the registry).
        own = range(worker, len(self._items), workers)
        # Connections are split evenly across the registry processes (no load balancer).
        return self._request(self._urls[worker % len(self._urls)], random.choice(own))

    def nth(self, k: int, order: list[int]) -> Request:
        return self._request(self._urls[k % len(self._urls)], order[k % len(order)])

    def __len__(self) -> int:
        return len(self._items)


async def _send(session: aiohttp.ClientSession, request: Request) -> int:
    async with session.post(request.url, data=request.body, headers=request.headers) as response:
        await response.read()
        return response.status


def _record(counts: Counts, status: int | None, latency_s: float) -> None:
    if status is None:
        counts.socket_errors += 1
    elif 200 <= status < 300:
        counts.ok += 1
        counts.latencies.append(latency_s)
    else:
        counts.status_errors += 1


async def closed_loop(
    session: aiohttp.ClientSession,
    requests: Requests,
    connections: int,
    warmup_s: float,
    duration_s: float,
) -> tuple[Counts, float]:
    loop = asyncio.get_running_loop()
    counts = Counts()
    measure_from = loop.time() + warmup_s
    measure_to = measure_from + duration_s

    workers = requests.workers(connections)

    async def worker(index: int) -> None:
        while (now := loop.time()) < measure_to:
            status: int | None
            try:
                status = await _send(session, requests.random(index, workers))
            except SOCKET_ERRORS:
                status = None
            done = loop.time()
            if now >= measure_from:
                _record(counts, status, done - now)

    return counts, await _window([worker(i) for i in range(workers)], measure_from, measure_to)


async def open_loop(
    session: aiohttp.ClientSession,
    requests: Requests,
    rate: float,
    warmup_s: float,
    duration_s: float,
) -> tuple[Counts, float]:
    loop = asyncio.get_running_loop()
    counts = Counts()
    start = loop.time() + 0.2
    measure_from = start + warmup_s
    measure_to = measure_from + duration_s
    # Each workspace beats once per len(requests)/rate seconds, in a shuffled order: the
    # schedule of a fleet whose heartbeats are spread evenly over the interval.
    order = list(range(len(requests)))
    random.shuffle(order)
    in_flight: set[asyncio.Task[None]] = set()

    async def fire(k: int, scheduled: float) -> None:
        status: int | None
        try:
            status = await _send(session, requests.nth(k, order))
        except SOCKET_ERRORS:
            status = None
        if scheduled >= measure_from:
            _record(counts, status, loop.time() - scheduled)

    async def schedule() -> None:
        k = 0
        while (due := start + k / rate) < measure_to:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(fire(k, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            k += 1
        # Beats scheduled in the window are waited for: a late answer is a slow one, not
        # a missing one (the client timeout bounds the wait).
        if in_flight:
            await asyncio.wait(set(in_flight))

    return counts, await _window([schedule()], measure_from, measure_to)


async def _window(
    jobs: list[Coroutine[Any, Any, None]], measure_from: float, measure_to: float
) -> float:
    """Run the jobs; print the window markers at its edges; returns the CPU spent inside."""
    loop = asyncio.get_running_loop()
    running = [asyncio.ensure_future(job) for job in jobs]
    await asyncio.sleep(max(0.0, measure_from - loop.time()))
    print("measure-start", flush=True)
    cpu_start = cpu.self_cpu_s()
    await asyncio.sleep(max(0.0, measure_to - loop.time()))
    print("measure-end", flush=True)
    cpu_used = cpu.self_cpu_s() - cpu_start
    await asyncio.gather(*running)
    return cpu_used


async def run(args: argparse.Namespace) -> dict[str, object]:
    if args.fleet_file is not None:
        fleet = Fleet.load(args.fleet_file, epoch=args.epoch, uptime_base=args.uptime_base)
    else:
        fleet = Fleet(args.salt, args.workspaces, args.epoch, args.uptime_base)
    last = args.last or fleet.size
    urls = [f"{base.rstrip('/')}/registry/heartbeat" for base in args.url]
    requests = Requests(fleet, args.first, last, urls, constant=args.constant_bodies)
    limit = args.connections
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        if args.rate:
            counts, cpu_s = await open_loop(
                session, requests, args.rate, args.warmup, args.duration
            )
        else:
            counts, cpu_s = await closed_loop(
                session, requests, args.connections, args.warmup, args.duration
            )
    return {
        "requests": counts.ok + counts.status_errors + counts.socket_errors,
        "ok": counts.ok,
        "status_errors": counts.status_errors,
        "socket_errors": counts.socket_errors,
        "duration_s": args.duration,
        "cpu_s": cpu_s,
        "latency": Latencies.of(counts.latencies).to_json(),
        # Raw samples (µs) so the parent can merge several generators' percentiles exactly.
        "samples_us": [round(s * 1e6) for s in counts.latencies],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", action="append", required=True, help="registry base URL (repeat)")
    parser.add_argument("--salt", required=True, help="the fleet's salt (bench/fleet.py)")
    parser.add_argument("--workspaces", type=int, required=True)
    parser.add_argument(
        "--fleet-file", type=Path, default=None, help="a recorded fleet (Fleet.write_file)"
    )
    parser.add_argument("--epoch", type=int, default=0, help="the fleet's uptime clock")
    parser.add_argument("--uptime-base", type=int, default=SYNTHETIC_UPTIME_BASE)
    parser.add_argument(
        "--constant-bodies", action="store_true", help="the same body every beat (as before)"
    )
    parser.add_argument("--first", type=int, default=1, help="this process's first workspace")
    parser.add_argument("--last", type=int, default=0, help="its last (0: the fleet's last)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: beats per second")
    parser.add_argument("--timeout", type=float, default=10.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(run(parse_args(argv)))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
