"""The registry's own view of heartbeat latency (its /metrics histogram): where a tail seen
by the load generator was spent — inside the handler, or before it (accept, the event loop,
the generator itself)."""

from __future__ import annotations

import re
import urllib.request

_BUCKET = re.compile(
    r'^registry_heartbeat_seconds_bucket\{kind="heartbeat",le="([^"]+)"\} ([0-9.e+]+)$',
    re.MULTILINE,
)


def heartbeat_buckets(base_url: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound s, count) pairs of the heartbeat latency histogram."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    return [(float(le), float(n)) for le, n in _BUCKET.findall(text)]


def summary(buckets_by_process: list[list[tuple[float, float]]]) -> str:
    """`share of beats answered within each bound`, over every process (counts summed)."""
    merged: dict[float, float] = {}
    for buckets in buckets_by_process:
        for bound, count in buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    total = merged.get(float("inf"), 0.0)
    if not total:
        return "no heartbeats recorded"
    parts = [
        f"<= {bound * 1e3:g} ms: {count / total:.2%}"
        for bound, count in sorted(merged.items())
        if bound != float("inf")
    ]
    return f"server-side (registry /metrics, {total:,.0f} beats incl. warm-up): " + ", ".join(parts)
