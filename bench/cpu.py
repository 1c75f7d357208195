"""CPU accounting from /proc: who used the two cores during a measured window."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces: the fields that follow start after its closing paren.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float:
    """utime + stime of one live process, in seconds."""
    fields = _stat_fields(pid)
    # After comm, field index 0 is `state`; utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_cpu_s() -> float:
    """Every `postgres` process's utime + stime, plus reaped children's (cutime + cstime).

    Backends come and go (pgbench opens its own); a backend that exits is reaped by the
    postmaster, whose cutime then carries its whole life. Summed over both, a delta between
    two snapshots counts exactly the CPU spent in between. Every PostgreSQL on the machine
    is counted, including other users' servers: the machine is shared.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = _stat_fields(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited while we looked
        total += sum(int(f) for f in fields[11:15])
    return total / _TICK


def machine_busy_s() -> float:
    """Non-idle CPU time of the whole machine (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = values[3], values[4]
    # guest time is already counted in user; the first 8 columns are the whole.
    return (sum(values[:8]) - idle - iowait) / _TICK


def children_cpu_s() -> float:
    """CPU of this process's reaped children (pgbench, wrk once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class Snapshot:
    registry_s: float
    postgres_s: float
    machine_s: float


def snapshot(registry_pids: list[int]) -> Snapshot:
    return Snapshot(
        registry_s=sum(process_cpu_s(pid) for pid in registry_pids),
        postgres_s=postgres_cpu_s(),
        machine_s=machine_busy_s(),
    )


@dataclass(frozen=True, slots=True)
class CpuSplit:
    """Cores used on average over a window, by party."""

    registry: float
    postgres: float
    loadgen: float
    machine: float

    @property
    def other(self) -> float:
        # Everything else on this shared machine (other users' jobs, the bench driver).
        return max(0.0, self.machine - self.registry - self.postgres - self.loadgen)


def split(start: Snapshot, end: Snapshot, loadgen_s: float, wall_s: float) -> CpuSplit:
    return CpuSplit(
        registry=(end.registry_s - start.registry_s) / wall_s,
        postgres=(end.postgres_s - start.postgres_s) / wall_s,
        loadgen=loadgen_s / wall_s,
        machine=(end.machine_s - start.machine_s) / wall_s,
    )
