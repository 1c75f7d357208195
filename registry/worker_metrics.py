"""/metrics with several workers on one port: one view of all of them, each series labelled.

A scrape through the shared port reaches one worker, chosen by the kernel. Were that worker to
answer for itself alone, successive scrapes would see different processes' counters under one
series, and rates would be nonsense. So the worker that is asked fetches its siblings' own
views (each listens on an abstract Unix socket of its own, registry/workers.py) and answers
with all of them, every process series labelled `worker="i"`: the per-process view that
prometheus_client's multiprocess mode would sum away (gauges such as pool connections and
requests in flight are per process by nature) and without its shared files and the write per
increment on the heartbeat path. The fleet-wide gauges (read from the database, the same
whichever worker reads them) appear once, unlabelled, from the worker asked.
`registry_worker_up{worker}` says whose view is missing (0: it did not answer in time).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from registry.workers import Worker, view_address

# The fleet gauges (registry/fleet_gauges.py): read from the database, not counted here.
FLEET_FAMILIES = frozenset(
    {
        "registry_workspaces",
        "registry_workspaces_plugins_sync",
        "registry_reconcile_backlog",
        "registry_database_up",
        "registry_metrics_fleet_query_seconds",
        "registry_mass_expiry_guard_holding",
    }
)
SIBLING_TIMEOUT_S = 2.0
PID_HEADER = "X-Registry-Worker-Pid"
VIEW_PATH = "/metrics"


class _Families:
    """A collector that yields families already built (prometheus_client renders them)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def _sibling_view(address: str) -> tuple[str, int]:
    timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)
    connector = aiohttp.UnixConnector(path=address)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"http://worker{VIEW_PATH}") as response,
    ):
        response.raise_for_status()
        return await response.text(), int(response.headers[PID_HEADER])


async def merged_view(local: bytes, worker: Worker, host: str, port: int) -> bytes:
    """This worker's exposition with its siblings', every process series labelled."""
    others = [index for index in range(worker.count) if index != worker.index]
    fetched = await asyncio.gather(
        *(_sibling_view(view_address(host, port, index)) for index in others),
        return_exceptions=True,
    )
    views: list[tuple[int, str, int | None]] = [(worker.index, local.decode(), os.getpid())]
    for index, result in zip(others, fetched, strict=True):
        views.append((index, "", None) if isinstance(result, BaseException) else (index, *result))
    merged: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "registry_worker_up",
        "1 when this worker's view is in this scrape, else 0.",
        labels=["worker"],
    )
    pids = GaugeMetricFamily(
        "registry_worker_pid", "The process id of each worker that answered.", labels=["worker"]
    )
    for index, text, pid in sorted(views, key=lambda view: view[0]):
        label = str(index)
        up.add_metric([label], 0 if pid is None else 1)
        if pid is None:
            continue
        pids.add_metric([label], pid)
        for family in text_string_to_metric_families(text):
            if family.name in FLEET_FAMILIES:
                if index != worker.index:
                    continue
                samples = family.samples
            else:
                samples = [s._replace(labels={**s.labels, "worker": label}) for s in family.samples]
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), up, pids]))
    return generate_latest(registry)


def view_app(own_view: Callable[[], bytes]) -> web.Application:
    """What a worker serves its siblings on its Unix socket: its own view, nothing else."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            body=own_view(),
            headers={"Content-Type": CONTENT_TYPE_LATEST, PID_HEADER: str(os.getpid())},
        )

    app = web.Application()
    app.router.add_get(VIEW_PATH, answer)
    return app
