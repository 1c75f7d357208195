"""pgbench running the single-statement heartbeat: the per-statement limit of this machine.

One statement per beat, as a client holding one connection would send it: lock the row
(id and token hash must match), apply the transition, write the heartbeat fields, return the
previous and the new status. It leaves out what the registry's batched statement adds for
rare rows (events, reconcile intents, actions), which the steady state never writes.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import cpu
from bench.fleet import (
    MAPPING,
    MAX_ERROR_RATE,
    MAX_TASKS,
    SQL_ID,
    SQL_TOKEN_HASH,
    UPTIME_SPREAD,
    Fleet,
)
from bench.stats import Latencies

# How the script finds workspace n's row: derived from n as the synthetic fleet's ids and tokens
# are (two hash functions computed in SQL), or looked up in the bench's own mapping table (one
# more primary-key probe), the only way to address a recorded fleet.
DERIVED_TARGET = f"""SELECT id, status AS previous_status FROM workspaces
    WHERE id = {SQL_ID.format(salt="(:salt)::text", n="(:n)::text")}
      AND token_hash = {SQL_TOKEN_HASH.format(salt="(:salt)::text", n="(:n)::text")}
    FOR UPDATE"""
LOOKUP_TARGET = f"""SELECT w.id, w.status AS previous_status
    FROM {MAPPING} f JOIN workspaces w ON w.id = f.id AND w.token_hash = f.token_hash
    WHERE f.n = (:n)::int
    FOR UPDATE OF w"""

# What a beat writes: today's constant body, or one varying as bench/fleet.py's does (the same
# uptime clock, so the registry phases after a pgbench run never see an uptime go down).
CONSTANT_FIELDS = "error_rate = 0, active_tasks = 1, uptime_seconds = 3600"
VARYING_FIELDS = """error_rate = (:err)::int / 1000.0, active_tasks = (:tasks)::int,
        uptime_seconds = (:base)::bigint + (:n)::bigint % (:spread)::bigint
                         + floor(extract(epoch FROM now()))::bigint - (:epoch)::bigint"""
VARYING_SETS = f"""\\set tasks random(0, {MAX_TASKS})
\\set err random(0, {round(MAX_ERROR_RATE * 1000) - 1})
"""

# pgbench substitutes :n and :salt as parameters in prepared mode (-M prepared, as asyncpg).
SCRIPT = """\\set n random(1, :workspaces)
{sets}WITH target AS (
    {target}
),
beat AS (
    UPDATE workspaces w SET
        status = CASE WHEN t.previous_status IN ('paused', 'removed') THEN t.previous_status
                      ELSE 'online' END,
        status_changed_at = CASE WHEN t.previous_status IN ('online', 'paused', 'removed')
                                 THEN w.status_changed_at ELSE now() END,
        last_heartbeat_at = now(),
        {fields},
        sample_error = '', current_task = '', monthly_spend = 0, runtime_state = 'ok'
    FROM target t
    WHERE w.id = t.id
    RETURNING t.previous_status, w.status
)
SELECT previous_status, status FROM beat;
"""


def script(*, lookup: bool, constant: bool) -> str:
    return SCRIPT.format(
        sets="" if constant else VARYING_SETS,
        target=LOOKUP_TARGET if lookup else DERIVED_TARGET,
        fields=CONSTANT_FIELDS if constant else VARYING_FIELDS,
    )


def find_pgbench(explicit: str | None = None) -> str:
    """The pgbench of the pgserver wheel (always installed with the registry), else PATH's."""
    if explicit:
        return explicit
    # Located without importing it: importing pgserver sets up platform directories and warns.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    for candidate in (
        shutil.which("pgbench"),
        *sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench")),
    ):
        if candidate:
            return str(candidate)
    raise FileNotFoundError("no pgbench: install the pgserver wheel or postgresql-client")


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    latencies: Latencies
    errors: int
    wall_s: float
    cpu: cpu.CpuSplit


_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def run(
    pgbench: str,
    dsn: str,
    fleet: Fleet,
    *,
    clients: int,
    duration_s: int,
    work_dir: Path,
    lookup: bool = False,
    constant: bool = False,
) -> PgbenchResult:
    """`lookup`: address rows through the mapping table (`bench.fleet.record_mapping`, which
    a recorded fleet needs); `constant`: write today's constant fields instead of varying ones."""
    path = work_dir / "heartbeat.sql"
    path.write_text(script(lookup=lookup, constant=constant))
    log_dir = work_dir / "pgbench-log"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir()
    command = [
        pgbench,
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={clients}",
        f"--jobs={min(clients, 2)}",
        f"--time={duration_s}",
        f"--file={path}",
        f"--define=workspaces={fleet.size}",
        f"--define=salt={fleet.salt}",
        f"--define=base={fleet.uptime_base}",
        f"--define=spread={UPTIME_SPREAD}",
        f"--define=epoch={fleet.epoch}",
        # A per-transaction log gives true percentiles; pgbench itself prints only averages.
        "--log",
        f"--log-prefix={log_dir / 'tx'}",
        dsn,
    ]
    before_children = cpu.children_cpu_s()
    start = cpu.snapshot([])
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_s = time.monotonic() - started
    end = cpu.snapshot([])
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    tps = _TPS.search(done.stdout)
    if tps is None:
        raise RuntimeError(f"no tps in pgbench output:\n{done.stdout}")
    failed = _FAILED.search(done.stdout)
    samples: list[float] = []
    for log in log_dir.iterdir():
        for line in log.read_text().splitlines():
            # client_id transaction_no time_us script_no epoch epoch_us
            samples.append(int(line.split()[2]) / 1e6)
    return PgbenchResult(
        tps=float(tps.group(1)),
        latencies=Latencies.of(samples),
        errors=int(failed.group(1)) if failed else 0,
        wall_s=wall_s,
        cpu=cpu.split(start, end, cpu.children_cpu_s() - before_children, wall_s),
    )
