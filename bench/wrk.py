"""wrk driving POST /registry/heartbeat, each thread beating its own share of the fleet.

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
from bench.fleet import MAX_ERROR_RATE, MAX_TASKS, UPTIME_SPREAD, Fleet
from bench.stats import Latencies

INSTALL_HINT = "wrk not found: install it with `apt-get update && apt-get install -y wrk`"

# One Lua state per wrk thread: each loads the fleet file and keeps its own share of the
# workspaces (line k goes to thread k mod threads; with one wrk per registry process, each
# takes its part of the fleet first: the script's arguments say which of how many), walked
# round robin in a shuffled order. So a workspace is beaten by one thread only and comes round
# again only after the rest of its share: never two beats of one workspace in flight at once,
# as a real runtime never has (two straddling a second could land out of order: an uptime
# going down, a restart to the registry). Bodies vary as bench/fleet.py's `varying_body`
# (the same uptime clock), or are the constant one (constant = 1).
LUA = """
local ids, tokens, plugins, order = {}, {}, {}, {}
local threads = 0
local next_k = 0
local epoch, base, spread, constant = %(epoch)d, %(base)d, %(spread)d, %(constant)d

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  local part, parts, of = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
  local mine = part * of + thread_no - 1
  local line_no = 0
  for line in io.lines("%(fleet)s") do
    local id, token, reported = line:match("^(%%S+) (%%S+) (%%S+)$")
    if line_no %% (parts * of) == mine then
      ids[#ids + 1] = id
      tokens[#tokens + 1] = token
      if reported == "-" then plugins[#plugins + 1] = "" else
        plugins[#plugins + 1] = ',"plugins":' .. reported end
      -- n, for the uptime's per-workspace spread
      order[#order + 1] = line_no + 1
    end
    line_no = line_no + 1
  end
  math.randomseed(os.time() * 1000 + thread_no)
  for i = #order, 2, -1 do
    local j = math.random(i)
    order[i], order[j] = order[j], order[i]
    ids[i], ids[j] = ids[j], ids[i]
    tokens[i], tokens[j] = tokens[j], tokens[i]
    plugins[i], plugins[j] = plugins[j], plugins[i]
  end
end

function request()
  next_k = next_k %% #ids + 1
  local i = next_k
  local body
  if constant == 1 then
    body = '{"workspace_id":"' .. ids[i] .. '","error_rate":0.0,"active_tasks":1,' ..
      '"uptime_seconds":3600.0,"runtime_state":"ok"' .. plugins[i] .. '}'
  else
    body = string.format(
      '{"workspace_id":"%%s","error_rate":%%.3f,"active_tasks":%%d,"uptime_seconds":%%d,' ..
      '"runtime_state":"ok"%%s}',
      ids[i], math.random() * %(max_error)s, math.random(0, %(max_tasks)d),
      base + order[i] %% spread + (os.time() - epoch), plugins[i])
  end
  return wrk.format("POST", "/registry/heartbeat",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[i]},
    body)
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


def write_script(work_dir: Path, fleet: Fleet, fleet_file: Path, *, constant: bool = False) -> Path:
    """The Lua script for `fleet`, whose `write_file` wrote `fleet_file`."""
    path = work_dir / "heartbeat.lua"
    path.write_text(
        LUA
        % {
            "fleet": fleet_file,
            "epoch": fleet.epoch,
            "base": fleet.uptime_base,
            "spread": UPTIME_SPREAD,
            "constant": int(constant),
            "max_error": repr(MAX_ERROR_RATE),
            "max_tasks": MAX_TASKS,
        }
    )
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    status_errors: int  # wrk counts answers >= 400
    socket_errors: int
    duration_s: float
    latencies: Latencies


def start(
    url: str, script: Path, connections: int, duration_s: float, part: int = 0, parts: int = 1
) -> subprocess.Popen[str]:
    """wrk on `url`, beating part `part` of `parts` of the fleet."""
    threads = min(2, connections)
    command = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration_s))}s",
        "--timeout=10s",
        f"--script={script}",
        url,
        # The script's arguments (after the URL): which part of the fleet is this process's,
        # of how many, and how many threads share it.
        str(part),
        str(parts),
        str(threads),
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
    processes = [
        start(url, script, per, duration_s, part, len(urls)) for part, url in enumerate(urls)
    ]
    results = [collect(p) for p in processes]
    return results, time.monotonic() - started, cpu.children_cpu_s() - before
