"""Running one claimed reconcile: plan, stage, deliver, record; always ending terminal."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import aiojobs
import asyncpg

from registry.db import reconciles, workspaces
from registry.db.errors import DatabaseUnavailable
from registry.db.reconciles import Claim, Outcome, RestartBudget, StepDone
from registry.metrics import Metrics
from registry.plugins import (
    FetchFailed,
    FetchLimits,
    PluginError,
    SourceSettings,
    StagedPlugin,
    deliver_to_filesystem,
    parse_source,
    remove_from_filesystem,
)
from registry.plugins.http_delivery import deliver_over_http, remove_over_http
from registry.plugins.shared_fetch import Asked, SharedFetcher
from registry.plugins.tree_cache import TreeCache
from registry.reconcile.plan import PlannedStep, observed_shas, plan
from registry.statuses import Status

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TreeCacheConfig:
    root: Path
    idle_s: float
    max_bytes: int


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    plugins_dir: Path
    # This process's staging directory (registry/plugins/staging.py), never TMPDIR.
    staging_dir: Path
    sources: SourceSettings
    limits: FetchLimits
    timeout_s: float
    max_attempts: int
    retry_base_s: float
    retry_cap_s: float
    restart_budget: RestartBudget
    # Where fetched git trees are cached, for how long and up to how much (None: no cache).
    tree_cache: TreeCacheConfig | None = None
    fetch_shared: bool = True

    def retry_delay(self, attempt: int) -> float:
        """Capped exponential backoff with jitter, so a fleet's retries do not align."""
        ceiling = min(self.retry_cap_s, self.retry_base_s * 2.0 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311


@dataclass(frozen=True, slots=True)
class _Context:
    workspace: workspaces.Workspace
    steps: list[PlannedStep]


def _asked(claim: Claim) -> Asked:
    return Asked(requested_at=claim.requested_at, claimed_at=claim.claimed_at)


class Reconciler:
    """Executes claimed runs; safe to run any run twice.

    The only state kept between runs is the shared fetching (resolutions, tree cache): what
    one run fetched serves the others of a fan-out, never a run asked after it was fetched.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        scheduler: aiojobs.Scheduler,
        http: aiohttp.ClientSession,
        config: ReconcileConfig,
        owner: str,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._pool = pool
        self._scheduler = scheduler
        self._http = http
        self._config = config
        self._owner = owner
        cache = config.tree_cache
        self._fetcher = SharedFetcher(
            config.sources,
            config.limits,
            None
            if cache is None or cache.max_bytes == 0 or not config.fetch_shared
            else TreeCache(cache.root, idle_s=cache.idle_s, max_bytes=cache.max_bytes),
            share=config.fetch_shared,
        )

    @property
    def max_attempts(self) -> int:
        return self._config.max_attempts

    async def run(self, claim: Claim) -> Outcome:
        """Run to a terminal status. A cancelled run (shutdown) is handed back as an intent."""
        context = {"reconcile_id": str(claim.id), "workspace_id": str(claim.workspace_id)}
        log.info("reconcile attempt %d started", claim.attempt, extra=context)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._config.timeout_s):
                outcome = await self._execute(claim)
        except TimeoutError:
            outcome = Outcome("failed", f"timed out after {self._config.timeout_s:g} s")
        except asyncio.CancelledError:
            # The terminal write must not ride on the cancelled work (DESIGN lesson 8). The
            # shield covers a cancelled job, not a closing scheduler (aiojobs cancels shields
            # then too): for that, the worker hands back what is left (ReconcileWorker.hand_back).
            await self._scheduler.shield(self._release(claim))
            raise
        except DatabaseUnavailable as exc:
            outcome = Outcome("failed", f"database unavailable: {exc}", transient=True)
        except Exception as exc:
            log.exception("reconcile crashed", extra=context)
            outcome = Outcome("failed", f"internal error: {type(exc).__name__}")
        self._metrics.reconcile_seconds.observe(time.perf_counter() - started)
        await self._scheduler.shield(self._conclude(claim, outcome))
        return outcome

    async def _conclude(self, claim: Claim, outcome: Outcome) -> None:
        context = {"reconcile_id": str(claim.id), "workspace_id": str(claim.workspace_id)}
        retry = (
            outcome.status == "failed"
            and outcome.transient
            and claim.attempt < self._config.max_attempts
        )
        async with self._pool.acquire() as conn:
            if retry:
                assert outcome.error is not None
                delay = self._config.retry_delay(claim.attempt)
                if await reconciles.retry_later(conn, claim.id, self._owner, outcome.error, delay):
                    log.info("reconcile retry in %.1f s: %s", delay, outcome.error, extra=context)
                    self._metrics.reconcile_retries.inc()
                    self._metrics.reconcile_runs.labels(claim.trigger, "retry").inc()
                    return
                outcome = Outcome("failed", f"{outcome.error} (a queued run takes over)")
            elif outcome.status == "failed" and outcome.transient:
                outcome = Outcome(
                    "failed", f"{outcome.error} (gave up after {claim.attempt} attempts)"
                )
            finished = await reconciles.finish(
                conn, claim.id, self._owner, outcome, budget=self._config.restart_budget
            )
        self._metrics.reconcile_runs.labels(claim.trigger, finished.status).inc()
        if finished.status == "lost":
            log.warning("reconcile lease lost before the outcome was written", extra=context)
        else:
            # A run that ended failed is worth a warning; each failed step logged its own.
            level = logging.WARNING if outcome.status == "failed" else logging.INFO
            log.log(level, "reconcile %s %s", outcome.status, outcome.error or "", extra=context)

    async def _release(self, claim: Claim) -> None:
        async with self._pool.acquire() as conn:
            await reconciles.release(conn, claim.id, self._owner)

    async def _load(self, workspace_id: uuid.UUID) -> _Context | None:
        async with self._pool.acquire() as conn:
            workspace = await workspaces.get_workspace(conn, workspace_id)
            if workspace is None:
                return None
            declared = await workspaces.declared_plugins(conn, workspace_id)
            installed = await workspaces.installed_plugins(conn, workspace_id)
        steps = plan(
            declared,
            {p.name: p for p in installed},
            observed_shas(workspace.observed_plugins),
        )
        return _Context(workspace, steps)

    async def _execute(self, claim: Claim) -> Outcome:
        context = await self._load(claim.workspace_id)
        if context is None:
            return Outcome("failed", "workspace no longer exists")
        if context.workspace.status is Status.REMOVED:
            return Outcome("failed", "workspace was removed")
        failures: list[str] = []
        transient = True
        for planned in context.steps:
            step, error = await self._apply(claim, context.workspace, planned)
            async with self._pool.acquire() as conn:
                await reconciles.insert_step(conn, claim.id, step)
            if error is not None:
                # Separate fields, so a log query can group failures by code or plugin.
                log.warning(
                    "reconcile step failed: %s",
                    error.message,
                    extra={
                        "workspace_id": str(claim.workspace_id),
                        "reconcile_id": str(claim.id),
                        "code": error.code,
                        "plugin": planned.plugin,
                        "source": planned.source,
                        "action": step.action,
                        "transient": error.transient,
                    },
                )
                failures.append(f"{planned.plugin}: {error.code}: {error.message}")
                transient = transient and error.transient
        if failures:
            return Outcome("failed", "; ".join(failures), transient=transient)
        return Outcome("succeeded", None)

    async def _apply(
        self, claim: Claim, workspace: workspaces.Workspace, planned: PlannedStep
    ) -> tuple[StepDone, PluginError | None]:
        step, error = await self._perform(claim, workspace, planned)
        self._metrics.reconcile_step_seconds.labels(step.action, step.status).observe(step.seconds)
        return step, error

    async def _perform(
        self, claim: Claim, workspace: workspaces.Workspace, planned: PlannedStep
    ) -> tuple[StepDone, PluginError | None]:
        started = time.monotonic()
        action, sha = planned.action, planned.installed_sha
        try:
            if action == "skip" and claim.refresh:
                # Refresh: has the declared source moved since it was installed?
                latest = await self._fetcher.version(
                    parse_source(planned.source, self._config.sources), _asked(claim)
                )
                if latest != planned.installed_sha:
                    action = "upgrade"
            if action == "remove":
                await self._remove(workspace, planned.plugin)
            elif action != "skip":
                sha = await self._install(claim, workspace, planned)
        except PluginError as exc:
            step = StepDone(
                planned.plugin, action, "failed", planned.source, None,
                time.monotonic() - started, f"{exc.code}: {exc.message}", claim.attempt,
            )  # fmt: skip
            return step, exc
        status = "skipped" if action == "skip" else "succeeded"
        step = StepDone(
            planned.plugin, action, status, planned.source, sha,
            time.monotonic() - started, None, claim.attempt,
        )  # fmt: skip
        return step, None

    async def _install(
        self, claim: Claim, workspace: workspaces.Workspace, planned: PlannedStep
    ) -> str:
        # stage() checks the allowlist itself: every install path passes through it.
        source = parse_source(planned.source, self._config.sources)
        try:
            work_dir = Path(
                await asyncio.to_thread(
                    tempfile.mkdtemp, prefix="reconcile-", dir=self._config.staging_dir
                )
            )
        except OSError as exc:  # a full disk, say: this step fails with its own code
            raise FetchFailed(
                f"cannot make a staging directory: {exc}", code="stage_failed", transient=True
            ) from None
        try:
            staged = await self._fetcher.stage(source, work_dir, _asked(claim))
            await self._deliver(workspace, planned.plugin, staged)
        finally:
            await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
        # Recorded only now that the bytes are in place (DESIGN lesson 7).
        async with self._pool.acquire() as conn:
            await workspaces.record_installed(
                conn, workspace.id, planned.plugin, planned.source, staged.sha, staged.digest
            )
        return staged.sha

    def _workspace_url(self, workspace: workspaces.Workspace) -> str:
        if workspace.url is None:
            raise FetchFailed(
                "http delivery needs the workspace's url; it is set when the runtime registers",
                code="no_workspace_url",
                transient=True,
            )
        return workspace.url

    async def _deliver(
        self, workspace: workspaces.Workspace, name: str, staged: StagedPlugin
    ) -> None:
        if workspace.delivery == "filesystem":
            await deliver_to_filesystem(staged, self._config.plugins_dir, str(workspace.id), name)
            return
        await deliver_over_http(
            self._http,
            workspace_url=self._workspace_url(workspace),
            name=name,
            tree=staged.path,
            sha=staged.sha,
            timeout_s=self._config.limits.timeout_s,
        )

    async def _remove(self, workspace: workspaces.Workspace, name: str) -> None:
        if workspace.delivery == "filesystem":
            await remove_from_filesystem(self._config.plugins_dir, str(workspace.id), name)
        else:
            await remove_over_http(
                self._http,
                workspace_url=self._workspace_url(workspace),
                name=name,
                timeout_s=self._config.limits.timeout_s,
            )
        # The record goes only once the plugin is gone from the box.
        async with self._pool.acquire() as conn:
            await workspaces.forget_installed(conn, workspace.id, name)
