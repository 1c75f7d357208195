"""Many Server-Sent-Events subscribers to GET /events, in one process of their own.

Most subscribers only count what they receive (frames, `dropped` notices), so that this
process spends little CPU; a few "probes" parse every frame and time its delivery: receipt
minus the event's `at` (the database's clock, on this same machine).

Protocol with the parent: a line `ready` once every stream answered 200, then it reads until
a line on stdin (or stdin closes), then prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import orjson


@dataclass(slots=True)
class Counts:
    frames: int = 0
    dropped: int = 0
    delays_s: list[float] = field(default_factory=list)


FRAME_MARK = b"\nevent: "  # each event frame has exactly one


async def subscribe(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    probe: bool,
    counts: Counts,
    connected: asyncio.Queue[int],
) -> None:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        await connected.put(response.status)
        if response.status != 200:
            return
        carry = b""
        async for chunk in response.content.iter_any():
            data = carry + chunk
            if probe:
                *blocks, carry = data.split(b"\n\n")
                _parse(blocks, counts)
            else:
                # Only complete frames are counted; a mark never spans two of them.
                end = data.rfind(b"\n\n")
                if end < 0:
                    carry = data
                    continue
                complete, carry = data[: end + 2], data[end + 2 :]
                counts.frames += complete.count(FRAME_MARK)
                counts.dropped += complete.count(b"\nevent: dropped")


def _parse(blocks: list[bytes], counts: Counts) -> None:
    now = time.time()
    for block in blocks:
        if b"\ndata: " not in block:
            continue
        counts.frames += 1
        if b"\nevent: dropped" in block:
            counts.dropped += 1
            continue
        data = orjson.loads(block.split(b"\ndata: ", 1)[1])
        counts.delays_s.append(now - datetime.fromisoformat(data["at"]).timestamp())


async def run(args: argparse.Namespace) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connected: asyncio.Queue[int] = asyncio.Queue()
    counts = [Counts() for _ in range(args.subscribers)]
    filters = args.filter_id
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for i, c in enumerate(counts):
            # The first `filtered` subscribers watch one workspace each; the rest everything.
            query = f"?workspace_id={filters[i % len(filters)]}" if i < args.filtered else ""
            probe = i >= args.filtered and i < args.filtered + args.probes
            tasks.append(
                asyncio.create_task(
                    subscribe(session, f"{args.url}/events{query}", args.token, probe, c, connected)
                )
            )
        statuses = [await connected.get() for _ in tasks]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    unfiltered = counts[args.filtered :]
    return {
        "connected": sum(1 for s in statuses if s == 200),
        "refused": sum(1 for s in statuses if s != 200),
        "frames_unfiltered": sorted(c.frames for c in unfiltered),
        "frames_filtered": sum(c.frames for c in counts[: args.filtered]),
        "dropped": sum(c.dropped for c in counts),
        "delays_ms": [round(d * 1e3, 3) for c in unfiltered for d in c.delays_s],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--subscribers", type=int, required=True)
    parser.add_argument("--filtered", type=int, default=0, help="how many watch one workspace")
    parser.add_argument("--filter-id", action="append", default=[], help="workspace ids")
    parser.add_argument("--probes", type=int, default=10, help="unfiltered ones that time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(run(parse_args(argv)))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
