"""Settings: one frozen dataclass, read from REGISTRY_* environment variables."""

from __future__ import annotations

import functools
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from registry.workers import cpu_count


class SettingsError(ValueError):
    """A setting is missing or malformed; start-up stops with this message."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks; ValueError names the first that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR block") from None
    return tuple(networks)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "registry"


@dataclass(frozen=True, slots=True)
class Settings:
    # None: start the embedded PostgreSQL kept under data_dir/postgres.
    dsn: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    # Processes answering on the port (registry/workers.py); REGISTRY_WORKERS=auto: one per CPU.
    workers: int = 1
    # asyncio's own loop, or uvloop (`pip install uvloop`); docs/benchmarks.md has the A/B.
    event_loop: str = "asyncio"
    # None: `serve` generates one per start and prints it (development only).
    admin_token: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    plugins_dir: Path | None = None  # None: data_dir/plugins
    # Where plugins are fetched before delivery (never TMPDIR); None: data_dir/staging.
    staging_dir: Path | None = None
    # Source prefixes that may be installed; empty denies every plugin source.
    plugin_allowlist: tuple[str, ...] = ()
    github_base: str = "https://github.com"
    gitea_scheme: str = "https"
    # 64 KiB holds a heartbeat with hundreds of observed plugins; anything larger is abuse.
    max_body_bytes: int = 64 * 1024
    # Slow and greedy clients (registry/protocol.py, body.py, admission.py): a request head
    # must arrive within head_timeout_s and a body within body_timeout_s (408); a head holds at
    # most max_headers fields and max_header_bytes (431; a runtime sends under 1 KiB); beyond
    # max_connections open connections or max_requests_in_flight requests: 503 + Retry-After.
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 32
    max_connections: int = 10_000
    max_requests_in_flight: int = 1_000
    heartbeat_interval_s: float = 30.0
    # Concurrent heartbeats share one statement per batch; off: one statement per beat
    # (kept to measure what coalescing buys). Batches in flight at once, and their size cap.
    heartbeat_coalesce: bool = True
    heartbeat_max_in_flight: int = 2
    heartbeat_max_batch: int = 500
    # Liveness: silent this long → offline (None: three heartbeat intervals); provisioning
    # this long without a first heartbeat → failed.
    offline_after_s: float | None = None
    provision_timeout_s: float = 600.0
    sweep_interval_s: float = 5.0
    # A runtime on a slower interval than ours gets three of its own observed intervals
    # before it is offline, but never more than this (nor less than offline_after_s).
    offline_after_max_s: float = 300.0
    # A runtime that restarted while online (uptime went down, or it registered again) may be
    # a new box without its plugins: it gets a reconcile, at most once per this per workspace.
    restart_reconcile_every_s: float = 300.0
    # Drift (registry/drift.py): a live runtime whose report of its plugins has lacked some the
    # registry recorded as installed for this long (no restart pending) gets a reconcile, at
    # most once per drift_reconcile_every_s per workspace.
    drift_settle_s: float = 60.0
    drift_reconcile_every_s: float = 600.0
    # /metrics reads the fleet-wide gauges from the database at most this often (0: every
    # scrape): at 100k workspaces one read takes the database ~0.75 s (docs/benchmarks.md).
    metrics_cache_s: float = 30.0
    # GET /fleet's counts by status are at most this old (0: counted on every request): a
    # count is one scan of the live fleet (~60 ms at 100k workspaces, growing with it), and
    # dashboards poll. Counted at most once a second per process, in the background while
    # the last count is younger than this (registry/shared_read.py).
    fleet_cache_s: float = 10.0
    # Peers (addresses or CIDR blocks) whose X-Forwarded-Proto is believed: a TLS-terminating
    # proxy in front makes the dashboard's cookie Secure and its Origin check expect https.
    # Empty (the default): the header is ignored from everyone.
    trusted_proxies: tuple[str, ...] = ()
    # Token rotation: the previous token keeps working this long (0: at once, for a leaked
    # token; a rotation request can also ask for 0).
    token_rotation_grace_s: float = 3600.0
    # Refused runtime requests are written to their workspace at most this often.
    refusal_flush_interval_s: float = 2.0
    # Mass-expiry guard: a sweep that would take more than this share of a fleet of at least
    # min_fleet offline holds, and expires at most max(1, rate * live fleet) per sweep.
    mass_expiry_share: float = 0.3
    mass_expiry_min_fleet: int = 10
    mass_expiry_rate: float = 0.01
    # The guard releases only at or below this share (hysteresis; never above the share), once
    # the silent count has been steady for a liveness window, and keeps the rate for one more.
    mass_expiry_release_share: float = 0.1
    # SIGTERM: in-flight requests and running reconciles get this long to finish; a
    # reconcile still running then is handed back as a queued intent for the next process.
    shutdown_grace_s: float = 10.0
    log_format: str = "auto"  # json, text, or auto (text on a terminal)
    log_level: str = "info"
    pool_min_size: int = 2
    pool_max_size: int = 10
    db_timeout_s: float = 5.0
    # Background reconciles share the pool with heartbeats: keep them to a few connections.
    reconcile_concurrency: int = 4
    reconcile_timeout_s: float = 300.0
    reconcile_poll_s: float = 2.0
    # A process that stops renewing its lease this long is taken for dead and its run taken over.
    reconcile_lease_s: float = 10.0
    # Transient failures are retried: attempt n waits min(cap, base * 2^(n-1)), with jitter.
    reconcile_max_attempts: int = 5
    reconcile_retry_base_s: float = 2.0
    reconcile_retry_cap_s: float = 300.0
    # At most this many restarts asked of one workspace per window: stops restart loops.
    restart_budget: int = 3
    restart_budget_window_s: float = 3600.0
    fetch_timeout_s: float = 60.0
    fetch_max_bytes: int = 50 * 1024 * 1024
    fetch_max_files: int = 10_000
    # Fetched git trees are kept per (source, commit), so a fan-out fetches each tree once
    # (issue 13): evicted once unused this long, and least recently used past the byte cap
    # (0: no cache, every run fetches). None: data_dir/tree-cache.
    tree_cache_dir: Path | None = None
    tree_cache_idle_s: float = 3600.0
    tree_cache_max_bytes: int = 1024 * 1024 * 1024
    # Off: every run resolves and fetches for itself, no cache (kept to measure what sharing
    # buys, like heartbeat_coalesce).
    fetch_shared: bool = True
    # Retention: events older than this go, but each workspace keeps its last N whatever their
    # age; finished runs (with their steps) likewise; acknowledged actions after an age;
    # removed workspaces (their token answered 410 until then, 401 after) after an age.
    event_retention_s: float = 14 * 86400.0
    event_keep_per_workspace: int = 100
    reconcile_retention_s: float = 14 * 86400.0
    reconcile_keep_per_workspace: int = 20
    action_retention_s: float = 7 * 86400.0
    tombstone_retention_s: float = 30 * 86400.0
    # Pruning runs this often, deleting at most prune_batch rows per transaction, pausing
    # prune_pause_s between batches.
    prune_interval_s: float = 60.0
    prune_batch: int = 1000
    prune_pause_s: float = 0.05
    # The live event stream (GET /events): subscribers per process (503 beyond), the frames
    # one subscriber may fall behind before it is dropped (and told), and how often the one
    # reader of the process looks for new events when no notification woke it.
    event_max_subscribers: int = 1000
    event_subscriber_queue: int = 1000
    event_poll_s: float = 1.0
    # The feed writes each page of frames straight to every live subscriber's socket in one
    # pass (registry/event_feed.py); false is the previous path (one writer task per
    # subscriber, woken per page), kept to compare them in bench/event_stream.py.
    event_direct_writes: bool = True
    # The fan-out's budget of subscriber writes a second (0: unpaced): with N live subscribers
    # the stream delivers a page at most every N / budget seconds, so its cost to the process
    # and the machine stays bounded as subscribers are added; their latency grows instead.
    # Up to 100 subscribers nothing changes (the sequencer numbers events every 0.1 s); 500
    # wait up to 0.5 s (docs/benchmarks.md, "Pacing the fan-out").
    event_writes_per_s: float = 1000.0

    @property
    def resolved_offline_after_s(self) -> float:
        if self.offline_after_s is not None:
            return self.offline_after_s
        return 3 * self.heartbeat_interval_s

    @property
    def resolved_plugins_dir(self) -> Path:
        return self.plugins_dir if self.plugins_dir is not None else self.data_dir / "plugins"

    @property
    def resolved_staging_dir(self) -> Path:
        return self.staging_dir if self.staging_dir is not None else self.data_dir / "staging"

    @property
    def resolved_tree_cache_dir(self) -> Path:
        if self.tree_cache_dir is not None:
            return self.tree_cache_dir
        return self.data_dir / "tree-cache"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from REGISTRY_<FIELD> variables; `overrides` (e.g. CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"REGISTRY_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            parser = _PARSERS[f.name]
            try:
                values[f.name] = parser(raw)
            except ValueError as exc:
                raise SettingsError(f"REGISTRY_{f.name.upper()}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SettingsError(message)

        need(0 < self.port < 65536, f"port must be 1..65535, got {self.port}")
        need(self.workers >= 1, f"workers must be at least 1, got {self.workers}")
        need(self.event_loop in ("asyncio", "uvloop"), "event_loop must be asyncio or uvloop")
        need(self.max_body_bytes >= 1024, "max_body_bytes must be at least 1024")
        need(self.max_header_bytes >= 1024, "max_header_bytes must be at least 1024")
        need(self.max_headers >= 8, "max_headers must be at least 8")
        need(
            self.max_connections >= 1 and self.max_requests_in_flight >= 1,
            "max_connections and max_requests_in_flight must be positive",
        )
        need(
            1 <= self.pool_min_size <= self.pool_max_size,
            "need 1 <= pool_min_size <= pool_max_size",
        )
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(f"trusted_proxies: {exc}") from None
        need(
            self.admin_token is None or len(self.admin_token) >= 16,
            "admin_token must be at least 16 characters",
        )
        for name in (
            "heartbeat_interval_s",
            "db_timeout_s",
            "reconcile_timeout_s",
            "reconcile_poll_s",
            "reconcile_lease_s",
            "reconcile_retry_base_s",
            "reconcile_retry_cap_s",
            "restart_budget_window_s",
            "provision_timeout_s",
            "sweep_interval_s",
            "offline_after_max_s",
            "refusal_flush_interval_s",
            "restart_reconcile_every_s",
            "drift_settle_s",
            "drift_reconcile_every_s",
            "shutdown_grace_s",
            "head_timeout_s",
            "body_timeout_s",
            "fetch_timeout_s",
            "event_retention_s",
            "reconcile_retention_s",
            "action_retention_s",
            "tombstone_retention_s",
            "prune_interval_s",
            "tree_cache_idle_s",
            "event_poll_s",
        ):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, f"{name} must be a positive number")
        need(
            self.offline_after_s is None
            or (math.isfinite(self.offline_after_s) and self.offline_after_s > 0),
            "offline_after_s must be a positive number",
        )
        need(
            math.isfinite(self.token_rotation_grace_s) and self.token_rotation_grace_s >= 0,
            "token_rotation_grace_s must be zero or positive",
        )
        need(self.log_format in ("auto", "json", "text"), "log_format must be auto, json or text")
        need(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level must be debug, info, warning or error",
        )
        need(0 < self.mass_expiry_share <= 1, "mass_expiry_share must be in (0, 1]")
        need(0 < self.mass_expiry_rate <= 1, "mass_expiry_rate must be in (0, 1]")
        need(
            0 <= self.mass_expiry_release_share <= 1,
            "mass_expiry_release_share must be in [0, 1]",
        )
        need(self.fetch_max_bytes > 0 and self.fetch_max_files > 0, "fetch limits must be positive")
        need(
            self.event_keep_per_workspace >= 1 and self.reconcile_keep_per_workspace >= 1,
            # A workspace's latest event and last run explain its state: never prune them.
            "event_keep_per_workspace and reconcile_keep_per_workspace must be at least 1",
        )
        need(self.prune_batch > 0, "prune_batch must be positive")
        need(
            math.isfinite(self.metrics_cache_s) and self.metrics_cache_s >= 0,
            "metrics_cache_s must be zero or positive",
        )
        need(
            math.isfinite(self.fleet_cache_s) and self.fleet_cache_s >= 0,
            "fleet_cache_s must be zero or positive",
        )
        need(
            math.isfinite(self.event_writes_per_s) and self.event_writes_per_s >= 0,
            "event_writes_per_s must be zero or positive",
        )
        need(
            self.event_max_subscribers > 0 and self.event_subscriber_queue > 0,
            "event_max_subscribers and event_subscriber_queue must be positive",
        )
        need(
            math.isfinite(self.prune_pause_s) and self.prune_pause_s >= 0,
            "prune_pause_s must be zero or positive",
        )
        self._validate_together()

    def _validate_together(self) -> None:
        """Combinations that each setting alone cannot rule out; the message names both."""
        offline_after = (
            _var("offline_after_s")
            if self.offline_after_s is not None
            else f"{_var('offline_after_s')} (unset: 3 x {_var('heartbeat_interval_s')})"
        )
        offline_after_s = self.resolved_offline_after_s
        checks = [
            (
                # A beat arrives up to 1.1 intervals after the last one (the jitter) plus its
                # latency; a shorter window flaps the fleet offline between beats, and every
                # flip back online queues a reconcile.
                offline_after_s >= 2 * self.heartbeat_interval_s,
                f"{offline_after}={offline_after_s:g} must be at least twice "
                f"{_var('heartbeat_interval_s')}={self.heartbeat_interval_s:g}, or workspaces "
                "go offline between two heartbeats",
            ),
            (
                # A removed workspace's runtime learns to stop from the 410 of its next beat; once
                # the tombstone is deleted it gets a 401 and may retry for ever.
                self.tombstone_retention_s >= offline_after_s,
                f"{_var('tombstone_retention_s')}={self.tombstone_retention_s:g} must be at "
                f"least {offline_after}={offline_after_s:g}, or a removed workspace's runtime "
                "may never be told to stop (410)",
            ),
            (
                # Each reconcile holds at most one connection at a time; the pruner keeps one for
                # its whole pass, and the worker must still renew its leases (a lapsed lease
                # stops every run of this process). Heartbeats have a pool of their own.
                self.pool_max_size >= self.reconcile_concurrency + 2,
                f"{_var('pool_max_size')}={self.pool_max_size} must be at least "
                f"{_var('reconcile_concurrency')}={self.reconcile_concurrency} + 2: the "
                "pruner and the reconcile worker's lease renewals need connections too",
            ),
            (
                # A fetch that times out by itself is retried (transient); one cut off by the
                # run's time limit fails the run for good.
                self.fetch_timeout_s < self.reconcile_timeout_s,
                f"{_var('fetch_timeout_s')}={self.fetch_timeout_s:g} must be below "
                f"{_var('reconcile_timeout_s')}={self.reconcile_timeout_s:g}, or a hung plugin "
                "source fails the run without a retry",
            ),
            (
                # Every tree a fetch accepts fits: a cache that cannot hold one fetches twice.
                self.tree_cache_max_bytes == 0 or self.tree_cache_max_bytes >= self.fetch_max_bytes,
                f"{_var('tree_cache_max_bytes')}={self.tree_cache_max_bytes} must be 0 (no "
                f"cache) or at least {_var('fetch_max_bytes')}={self.fetch_max_bytes}, or the "
                "largest plugins cannot be cached",
            ),
            (
                # The restart budget counts the restart actions of its window.
                self.action_retention_s >= self.restart_budget_window_s,
                f"{_var('action_retention_s')}={self.action_retention_s:g} must be at least "
                f"{_var('restart_budget_window_s')}={self.restart_budget_window_s:g}, or the "
                "restart budget forgets restarts it must count",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


def _var(name: str) -> str:
    """The environment variable of a setting, as operators write it."""
    return f"REGISTRY_{name.upper()}"


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def parse_workers(raw: str) -> int:
    """A worker count, or `auto`: one per CPU this process may use."""
    if raw.strip().lower() == "auto":
        return cpu_count()
    return _positive_int(raw)


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _prefix_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _text(raw: str) -> str:
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "dsn": _text,
    "host": _text,
    "port": _positive_int,
    "workers": parse_workers,
    "event_loop": str.lower,
    "admin_token": _text,
    "data_dir": Path,
    "plugins_dir": Path,
    "staging_dir": Path,
    "plugin_allowlist": _prefix_list,
    "github_base": _text,
    "gitea_scheme": _text,
    "max_body_bytes": _positive_int,
    "head_timeout_s": _float,
    "body_timeout_s": _float,
    "max_header_bytes": _positive_int,
    "max_headers": _positive_int,
    "max_connections": _positive_int,
    "max_requests_in_flight": _positive_int,
    "heartbeat_interval_s": _float,
    "offline_after_s": _float,
    "provision_timeout_s": _float,
    "sweep_interval_s": _float,
    "offline_after_max_s": _float,
    "token_rotation_grace_s": _float,
    "refusal_flush_interval_s": _float,
    "restart_reconcile_every_s": _float,
    "drift_settle_s": _float,
    "drift_reconcile_every_s": _float,
    "metrics_cache_s": _float,
    "fleet_cache_s": _float,
    "trusted_proxies": _prefix_list,
    "mass_expiry_share": _float,
    "mass_expiry_min_fleet": _non_negative_int,
    "mass_expiry_rate": _float,
    "mass_expiry_release_share": _float,
    "shutdown_grace_s": _float,
    "log_format": str.lower,
    "log_level": str.lower,
    "heartbeat_coalesce": _bool,
    "heartbeat_max_in_flight": _positive_int,
    "heartbeat_max_batch": _positive_int,
    "pool_min_size": _positive_int,
    "pool_max_size": _positive_int,
    "db_timeout_s": _float,
    "reconcile_concurrency": _positive_int,
    "reconcile_timeout_s": _float,
    "reconcile_poll_s": _float,
    "reconcile_lease_s": _float,
    "reconcile_max_attempts": _positive_int,
    "reconcile_retry_base_s": _float,
    "reconcile_retry_cap_s": _float,
    "restart_budget": _non_negative_int,
    "restart_budget_window_s": _float,
    "fetch_timeout_s": _float,
    "fetch_max_bytes": _positive_int,
    "fetch_max_files": _positive_int,
    "tree_cache_dir": Path,
    "tree_cache_idle_s": _float,
    "tree_cache_max_bytes": _non_negative_int,
    "fetch_shared": _bool,
    "event_retention_s": _float,
    "event_keep_per_workspace": _positive_int,
    "reconcile_retention_s": _float,
    "reconcile_keep_per_workspace": _positive_int,
    "action_retention_s": _float,
    "tombstone_retention_s": _float,
    "prune_interval_s": _float,
    "prune_batch": _positive_int,
    "prune_pause_s": _float,
    "event_max_subscribers": _positive_int,
    "event_subscriber_queue": _positive_int,
    "event_poll_s": _float,
    "event_direct_writes": _bool,
    "event_writes_per_s": _float,
}
