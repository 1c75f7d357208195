"""wrk driving POST /registry/heartbeat, a random workspace (id + its token) per request.

Install: `apt-get update && apt-get install -y wrk` (Debian/Ubuntu); `brew install wrk` on
macOS. Without wrk the bench falls back to bench/loadgen.py (slower per request: it takes a
larger share of the two cores, which lowers what the registry can reach).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import cpu
from bench.stats import Latencies

INSTALL_HINT = "wrk not found: install it with `apt-get update && apt-get install -y wrk`"

# One Lua state per wrk thread: each loads the fleet file, and seeds its own generator so
# the threads do not walk the same sequence of workspaces.
LUA = """
local ids, tokens = {}, {}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  for line in io.lines("%(fleet)s") do
    local id, token = line:match("^(%%S+) (%%S+)$")
    ids[#ids + 1] = id
    tokens[#tokens + 1] = token
  end
  math.randomseed(os.time() * 1000 + thread_no)
end

function request()
  local i = math.random(#ids)
  return wrk.format("POST", "/registry/heartbeat",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[i]},
    '{"workspace_id":"' .. ids[i] .. '","error_rate":0.0,"active_tasks":1,' ..
    '"uptime_seconds":3600.0,"runtime_state":"ok"}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"connect":%%d,' ..
    '"read":%%d,"write":%%d,"timeout":%%d,"p50_us":%%d,"p95_us":%%d,"p99_us":%%d,' ..
    '"p999_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def write_script(work_dir: Path, fleet_file: Path) -> Path:
    path = work_dir / "heartbeat.lua"
    path.write_text(LUA % {"fleet": fleet_file})
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    status_errors: int  # wrk counts answers >= 400
    socket_errors: int
    duration_s: float
    latencies: Latencies


def start(url: str, script: Path, connections: int, duration_s: float) -> subprocess.Popen[str]:
    command = [
        "wrk",
        f"--threads={min(2, connections)}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration_s))}s",
        "--timeout=10s",
        f"--script={script}",
        url,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect(process: subprocess.Popen[str]) -> WrkResult:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{output}")
    line = next((ln for ln in output.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"no figures in wrk output:\n{output}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    # wrk's latency percentiles are over all requests, errors included.
    return WrkResult(
        requests=data["requests"],
        status_errors=data["status_errors"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        duration_s=data["duration_us"] / 1e6,
        latencies=Latencies(
            data["requests"],
            data["p50_us"] / 1e6,
            data["p95_us"] / 1e6,
            data["p99_us"] / 1e6,
            data["p999_us"] / 1e6,
            data["max_us"] / 1e6,
        ),
    )


def run_many(
    urls: list[str], script: Path, connections: int, duration_s: float
) -> tuple[list[WrkResult], float, float]:
    """One wrk per registry process, connections split between them; returns the results,
    the wall time and wrk's CPU (its children rusage: exact once the processes are reaped)."""
    before = cpu.children_cpu_s()
    started = time.monotonic()
    per = max(1, connections // len(urls))
    processes = [start(url, script, per, duration_s) for url in urls]
    results = [collect(p) for p in processes]
    return results, time.monotonic() - started, cpu.children_cpu_s() - before
