"""Every object shared through the aiohttp application, behind a typed key."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from registry.admission import Admission
from registry.events import EventHub
from registry.fleet_gauges import FleetGauges
from registry.fleet_history_cache import FleetHistoryCache
from registry.fleet_statuses import FleetStatuses
from registry.ingest import HeartbeatIngest
from registry.metrics import Metrics
from registry.plugins import SourceSettings
from registry.reconcile.worker import ReconcileWorker
from registry.refusals import RefusalLog
from registry.settings import Settings
from registry.tolerance import IgnoredFieldReporter
from registry.workers import Worker

SETTINGS = web.AppKey("settings", Settings)
DSN = web.AppKey("dsn", str)
POOL = web.AppKey("pool", asyncpg.Pool)
# The plugin-source policy (schemes, bases, allowlist), built once from the settings.
SOURCES = web.AppKey("sources", SourceSettings)
RECONCILER = web.AppKey("reconciler", ReconcileWorker)
EVENT_HUB = web.AppKey("event_hub", EventHub)
METRICS = web.AppKey("metrics", Metrics)
INGEST = web.AppKey("ingest", HeartbeatIngest)
IGNORED_FIELDS = web.AppKey("ignored_fields", IgnoredFieldReporter)
REFUSALS = web.AppKey("refusals", RefusalLog)
ADMISSION = web.AppKey("admission", Admission)
FLEET_GAUGES = web.AppKey("fleet_gauges", FleetGauges)
# Which of the processes sharing the port this is (registry/workers.py).
WORKER = web.AppKey("worker", Worker)
FLEET_HISTORY = web.AppKey("fleet_history", FleetHistoryCache)
FLEET_STATUSES = web.AppKey("fleet_statuses", FleetStatuses)
