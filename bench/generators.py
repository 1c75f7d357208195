"""Drive a load generator (wrk, or bench/loadgen.py in child processes) and account for it.

Either way the result is the same: beats/s, latency percentiles, errors, and the CPU split of
the measured window between the registry processes, PostgreSQL and the generator.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import cpu, wrk
from bench.fleet import Fleet
from bench.stats import Latencies


@dataclass(frozen=True, slots=True)
class Measurement:
    ok: int
    status_errors: int
    socket_errors: int
    wall_s: float
    rate: float  # 2xx answers per second
    latencies: Latencies
    cpu: cpu.CpuSplit

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors


def measure_wrk(
    urls: list[str], registry_pids: list[int], script: Path, connections: int, duration_s: float
) -> Measurement:
    start = cpu.snapshot(registry_pids)
    results, wall_s, wrk_cpu_s = wrk.run_many(urls, script, connections, duration_s)
    end = cpu.snapshot(registry_pids)
    requests = sum(r.requests for r in results)
    status_errors = sum(r.status_errors for r in results)
    socket_errors = sum(r.socket_errors for r in results)
    # With two wrk processes the percentiles cannot be merged exactly: report the worse.
    worst = max(results, key=lambda r: r.latencies.p99_s).latencies
    duration = max(r.duration_s for r in results)
    return Measurement(
        ok=requests - status_errors,
        status_errors=status_errors,
        socket_errors=socket_errors,
        wall_s=duration,
        rate=(requests - status_errors) / duration,
        latencies=Latencies(
            requests, worst.p50_s, worst.p95_s, worst.p99_s, worst.p999_s, worst.max_s
        ),
        cpu=cpu.split(start, end, wrk_cpu_s, wall_s),
    )


def spawn_python(
    urls: list[str],
    fleet: Fleet,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float,
    rate: float = 0.0,
    first: int = 1,
    last: int = 0,
    fleet_file: Path | None = None,
    constant_bodies: bool = False,
) -> subprocess.Popen[bytes]:
    """bench/loadgen.py beating `fleet`; a recorded fleet needs the file it was written to
    (`Fleet.write_file`), a synthetic one is derived again from its salt."""
    if fleet.is_recorded and fleet_file is None:
        raise ValueError("a recorded fleet is given to the load generator as its file")
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        f"--salt={fleet.salt}",
        f"--workspaces={fleet.size}",
        f"--epoch={fleet.epoch}",
        f"--uptime-base={fleet.uptime_base}",
        *([f"--fleet-file={fleet_file}"] if fleet.is_recorded else []),
        *(["--constant-bodies"] if constant_bodies else []),
        f"--first={first}",
        f"--last={last}",
        f"--connections={connections}",
        f"--duration={duration_s}",
        f"--warmup={warmup_s}",
        f"--rate={rate}",
        *(f"--url={url}" for url in urls),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE)


def _expect(process: subprocess.Popen[bytes], marker: bytes) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != marker:
        process.kill()
        rest, _ = process.communicate()
        raise RuntimeError(f"load generator said {line!r} instead of {marker!r}: {rest!r}")


def measure_python(
    processes: list[subprocess.Popen[bytes]], registry_pids: list[int]
) -> Measurement:
    """Sample CPU at the first generator's window markers; the others run the same window."""
    _expect(processes[0], b"measure-start")
    start = cpu.snapshot(registry_pids)
    started = time.monotonic()
    _expect(processes[0], b"measure-end")
    end = cpu.snapshot(registry_pids)
    wall_s = time.monotonic() - started
    results = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed ({process.returncode}): {output!r}")
        results.append(orjson.loads(output.strip().splitlines()[-1]))
    ok = sum(int(r["ok"]) for r in results)
    duration = float(results[0]["duration_s"])
    samples = [us / 1e6 for r in results for us in r["samples_us"]]
    return Measurement(
        ok=ok,
        status_errors=sum(int(r["status_errors"]) for r in results),
        socket_errors=sum(int(r["socket_errors"]) for r in results),
        wall_s=duration,
        rate=ok / duration,
        latencies=Latencies.of(samples),
        cpu=cpu.split(start, end, sum(float(r["cpu_s"]) for r in results), wall_s),
    )
