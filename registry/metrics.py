"""Prometheus metrics: one registry of collectors per application instance."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

# No `_created` series: one per labelled child doubles what a scrape carries, and nothing here
# reads them (Prometheus itself ignores them). Process-wide, like prometheus_client's setting.
disable_created_metrics()  # type: ignore[no-untyped-call]
# Heartbeats are answered in milliseconds; reconciles take seconds to minutes.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Every HTTP route: most answer in milliseconds, a few (an event stream) stay open for long.
HTTP_BUCKETS = (*FAST_BUCKETS, 5.0, 10.0, 60.0)


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children, each resolved once. `labels()` validates, joins and looks
    the values up under a lock on every call; on the heartbeat path that was ~3% of the
    process (docs/benchmarks.md). Only for label sets bounded by the caller (route names,
    methods, status codes, outcomes), like the metric itself."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def get(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The standard process_* and python_* series, in this registry (not the global one,
        # so several apps in one test process do not collide).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "registry_build_info",
            "Always 1; the version and git commit this process runs, as labels.",
            ["version", "git_sha"],
            registry=r,
        )
        self.http_requests = Counter(
            "registry_http_requests",
            "HTTP requests answered, by route name (the handler's, not the raw path; "
            "`unmatched` for no route), method and status code (499: the client hung up).",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "registry_http_request_seconds",
            "Time to answer an HTTP request, by route name and method (an event stream counts "
            "until it ends).",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.database_up = Gauge(
            "registry_database_up",
            "1 when this scrape's fleet-wide queries reached the database, else 0 (the fleet "
            "gauges then keep their last values).",
            registry=r,
        )
        self.workspaces_by_sync = Gauge(
            "registry_workspaces_plugins_sync",
            "Non-removed workspaces by plugins_sync, fleet-wide.",
            ["plugins_sync"],
            registry=r,
        )
        self.fleet_query_seconds = Gauge(
            "registry_metrics_fleet_query_seconds",
            "How long the fleet-wide queries behind the last refresh of the fleet gauges took.",
            registry=r,
        )
        self.sweep_last_run = Gauge(
            "registry_sweep_last_run_timestamp_seconds",
            "When this process last finished a liveness sweep (Unix time).",
            registry=r,
        )
        self.sweep_duration = Gauge(
            "registry_sweep_last_duration_seconds",
            "How long this process's last liveness sweep took.",
            registry=r,
        )
        self.heartbeats = Counter(
            "registry_heartbeats",
            "Heartbeats and registrations answered, by outcome and HTTP status code "
            "(outcome client_gone, code 499: the client hung up before the answer).",
            ["kind", "outcome", "code"],
            registry=r,
        )
        self.heartbeat_seconds = Histogram(
            "registry_heartbeat_seconds",
            "Time to answer a heartbeat or registration.",
            ["kind"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.ignored_fields = Counter(
            "registry_runtime_ignored_fields",
            "Unknown fields runtimes sent and the registry ignored, by route and field name "
            "(names outside a known list are counted as `other`).",
            ["kind", "field"],
            registry=r,
        )
        self.refusals_unrecorded = Counter(
            "registry_runtime_refusals_unrecorded",
            "Refused runtime requests not recorded on their workspace: too many distinct "
            "tokens were refused between two flushes.",
            registry=r,
        )
        self.heartbeat_batch_size = Histogram(
            "registry_heartbeat_batch_size",
            "Beats applied by one heartbeat statement.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.transitions = Counter(
            "registry_status_transitions",
            "Workspace status changes made by this process.",
            ["from_status", "to_status", "cause"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "registry_reconcile_runs",
            "Reconcile attempts finished by this process, by trigger and outcome "
            "(succeeded, failed, retry: a transient failure queued for another attempt, "
            "lost: the lease was taken over).",
            ["trigger", "outcome"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "registry_reconcile_seconds",
            "Duration of one reconcile attempt.",
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.reconcile_step_seconds = Histogram(
            "registry_reconcile_step_seconds",
            "Duration of one reconcile step, by action and status.",
            ["action", "status"],
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.reconcile_retries = Counter(
            "registry_reconcile_retries",
            "Reconcile attempts that failed transiently and were queued again.",
            registry=r,
        )
        self.reconcile_backlog = Gauge(
            "registry_reconcile_backlog",
            "Reconcile runs queued (due or waiting for a retry) or running, fleet-wide.",
            ["status"],
            registry=r,
        )
        self.sweeper_expired = Counter(
            "registry_sweeper_expired",
            "Workspaces the liveness sweeper of this process moved, by target status.",
            ["to_status"],
            registry=r,
        )
        self.mass_expiry_guard_holding = Gauge(
            "registry_mass_expiry_guard_holding",
            "1 while the mass-expiry guard holds back a fleet-wide expiry.",
            registry=r,
        )
        self.workspaces = Gauge(
            "registry_workspaces", "Workspaces by status, fleet-wide.", ["status"], registry=r
        )
        self.pool_connections = Gauge(
            "registry_db_pool_connections",
            "Database pool connections of this process, in use or idle.",
            ["state"],
            registry=r,
        )
        self.event_subscribers = Gauge(
            "registry_event_subscribers",
            "Server-Sent-Events subscribers connected to this process.",
            registry=r,
        )
        self.pruned_rows = Counter(
            "registry_pruned_rows",
            "History rows the retention pruner of this process deleted, by table.",
            ["table"],
            registry=r,
        )
        self.prune_last_run = Gauge(
            "registry_prune_last_run_timestamp_seconds",
            "When this process last finished a pruning pass (Unix time).",
            registry=r,
        )
        self.prune_duration = Gauge(
            "registry_prune_last_duration_seconds",
            "How long this process's last pruning pass took, pauses included.",
            registry=r,
        )
        self.turned_away = Counter(
            "registry_turned_away",
            "Requests and connections answered 503 `overloaded` without being served, by what "
            "was full (requests_in_flight, connections).",
            ["reason"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "registry_requests_in_flight",
            "Requests being served by this process at scrape time, under "
            "REGISTRY_MAX_REQUESTS_IN_FLIGHT (probes, scrapes and event streams not counted).",
            registry=r,
        )
        # The hot path's children (registry/http_metrics.py, handlers/runtime.py).
        self.http_requests_by = Children(self.http_requests)
        self.http_seconds_by = Children(self.http_seconds)
        self.heartbeats_by = Children(self.heartbeats)
        self.heartbeat_seconds_by = Children(self.heartbeat_seconds)
