"""Plain-text tables for the terminal and for docs/benchmarks.md (Markdown)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.cpu import CpuSplit
from bench.stats import Latencies


@dataclass(frozen=True, slots=True)
class Row:
    phase: str
    rate: float
    latencies: Latencies
    errors: int
    cpu: CpuSplit
    note: str = ""
    # Bytes of WAL the whole cluster wrote per beat answered (nan: not measured); the
    # cluster's, so other sessions on a shared server add to it.
    wal_per_beat: float = math.nan

    @property
    def registry_us_per_beat(self) -> float:
        """Registry CPU per beat answered: comparable across machines and loads."""
        return self.cpu.registry * 1e6 / self.rate if self.rate else math.nan


HEADER = (
    "phase",
    "beats/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "CPU registry",
    "CPU postgres",
    "CPU loadgen",
    "CPU other",
    "registry µs/beat",
    "WAL B/beat",
    "note",
)


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def cells(row: Row) -> tuple[str, ...]:
    return (
        row.phase,
        f"{row.rate:,.0f}",
        _ms(row.latencies.p50_s),
        _ms(row.latencies.p99_s),
        str(row.errors),
        f"{row.cpu.registry:.2f}",
        f"{row.cpu.postgres:.2f}",
        f"{row.cpu.loadgen:.2f}",
        f"{row.cpu.other:.2f}",
        "n/a" if math.isnan(row.registry_us_per_beat) else f"{row.registry_us_per_beat:.0f}",
        "n/a" if math.isnan(row.wal_per_beat) else f"{row.wal_per_beat:,.0f}",
        row.note,
    )


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
