"""Latency percentiles from raw samples (seconds)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Latencies:
    count: int
    p50_s: float
    p95_s: float
    p99_s: float
    p999_s: float
    max_s: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> Latencies:
        ordered = sorted(samples)
        if not ordered:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)

        def at(q: float) -> float:
            # Nearest rank: the smallest sample with at least q of all samples at or below it.
            return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]

        return cls(len(ordered), at(0.50), at(0.95), at(0.99), at(0.999), ordered[-1])

    def to_json(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50_ms": self.p50_s * 1e3,
            "p95_ms": self.p95_s * 1e3,
            "p99_ms": self.p99_s * 1e3,
            "p999_ms": self.p999_s * 1e3,
            "max_ms": self.max_s * 1e3,
        }

    @classmethod
    def from_json(cls, data: dict[str, float]) -> Latencies:
        return cls(
            int(data["count"]),
            data["p50_ms"] / 1e3,
            data["p95_ms"] / 1e3,
            data["p99_ms"] / 1e3,
            data["p999_ms"] / 1e3,
            data["max_ms"] / 1e3,
        )
