"""Reporting what the tolerant runtime routes ignored: a metric, a rate-limited log line.

Runtimes add fields freely (capability metadata, `is_busy`, `schema_version`, ...); the
registry ignores the ones it does not know rather than refuse the beat, and says so. The
metric's label is bounded: names runtimes are known to send keep their own series, every
other name is counted under `other`, so a runtime sending random keys cannot blow up the
metric's cardinality.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Hashable

from registry.metrics import Metrics

log = logging.getLogger(__name__)

# Field names seen from runtimes newer than this registry; each gets its own series.
KNOWN_FUTURE_FIELDS = frozenset(
    {
        "capabilities",
        "is_busy",
        "schema_version",
        "version",
        "runtime_version",
        "hostname",
        "labels",
        "metadata",
        "interval_s",
    }
)
OTHER = "other"

IGNORED_LOG_EVERY_S = 3600.0


class RateLimit:
    """Says yes to a key at most once per `every_s`; memory bounded by `max_keys`."""

    def __init__(
        self,
        every_s: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every_s = every_s
        self._max_keys = max_keys
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            return False
        if last is None and len(self._last) >= self._max_keys:
            # Forgetting everything costs at most one extra line per key; never unbounded memory.
            self._last.clear()
        self._last[key] = now
        return True


def metric_label(field: str) -> str:
    return field if field in KNOWN_FUTURE_FIELDS else OTHER


class IgnoredFieldReporter:
    def __init__(self, metrics: Metrics, *, log_every_s: float = IGNORED_LOG_EVERY_S) -> None:
        self._metrics = metrics
        self._log_limit = RateLimit(log_every_s)

    def report(self, kind: str, workspace_id: uuid.UUID | None, fields: list[str]) -> None:
        for name in fields:
            self._metrics.ignored_fields.labels(kind, metric_label(name)).inc()
            if self._log_limit.allow((workspace_id, name)):
                log.info(
                    "%s of workspace %s: ignored unknown field %r (logged once an hour)",
                    kind,
                    workspace_id,
                    name[:64],
                )
