"""Running one claimed reconcile: plan, stage, deliver, record; always ending terminal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import aiojobs
import asyncpg

from registry.db import reconciles, workspaces
from registry.db.reconciles import Claim, Outcome, Step
from registry.plugins import (
    FetchFailed,
    FetchLimits,
    PluginError,
    SourceSettings,
    StagedPlugin,
    deliver_to_filesystem,
    parse_source,
    stage,
)
from registry.plugins.http_delivery import deliver_over_http
from registry.reconcile.plan import PlannedStep, observed_shas, plan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    plugins_dir: Path
    sources: SourceSettings
    limits: FetchLimits
    timeout_s: float


@dataclass(frozen=True, slots=True)
class _Context:
    workspace: workspaces.Workspace
    steps: list[PlannedStep]


def _now() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    """Executes claimed runs. Holds no state between runs; safe to run any run twice."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        scheduler: aiojobs.Scheduler,
        http: aiohttp.ClientSession,
        config: ReconcileConfig,
        owner: str,
    ) -> None:
        self._pool = pool
        self._scheduler = scheduler
        self._http = http
        self._config = config
        self._owner = owner

    async def run(self, claim: Claim) -> Outcome:
        """Run to a terminal status. A cancelled run (shutdown) is handed back as an intent."""
        log.info(
            "reconcile started",
            extra={"reconcile_id": str(claim.id), "workspace_id": str(claim.workspace_id)},
        )
        try:
            async with asyncio.timeout(self._config.timeout_s):
                outcome = await self._execute(claim)
        except TimeoutError:
            outcome = Outcome("failed", f"timed out after {self._config.timeout_s:g} s", [])
        except asyncio.CancelledError:
            # The terminal write must not ride on the cancelled work (DESIGN lesson 8).
            await self._scheduler.shield(self._release(claim))
            raise
        except Exception as exc:
            log.exception("reconcile %s crashed", claim.id)
            outcome = Outcome("failed", f"internal error: {type(exc).__name__}", [])
        await self._scheduler.shield(self._finish(claim, outcome))
        return outcome

    async def _finish(self, claim: Claim, outcome: Outcome) -> None:
        async with self._pool.acquire() as conn:
            written = await reconciles.finish(conn, claim.id, self._owner, outcome)
        if not written:
            log.warning("reconcile %s: lease lost before the outcome was written", claim.id)
        log.info(
            "reconcile %s",
            outcome.status,
            extra={
                "reconcile_id": str(claim.id),
                "workspace_id": str(claim.workspace_id),
                "error": outcome.error,
            },
        )

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
            return Outcome("failed", "workspace no longer exists", [])
        if context.workspace.status.value == "removed":
            return Outcome("failed", "workspace was removed", [])
        installed: list[str] = []
        failures: list[str] = []
        for planned in context.steps:
            step = await self._apply(claim, context.workspace, planned)
            async with self._pool.acquire() as conn:
                await reconciles.insert_step(conn, claim.id, step)
            if step.status == "failed":
                failures.append(f"{planned.plugin}: {step.error}")
            elif step.action != "skip":
                installed.append(planned.plugin)
        if failures:
            return Outcome("failed", "; ".join(failures), installed)
        return Outcome("succeeded", None, installed)

    async def _apply(
        self, claim: Claim, workspace: workspaces.Workspace, planned: PlannedStep
    ) -> Step:
        started = _now()
        if planned.action == "skip":
            return Step(
                planned.plugin,
                "skip",
                "skipped",
                planned.source,
                planned.installed_sha,
                started,
                _now(),
                None,
                claim.attempt,
            )
        try:
            sha = await self._install(workspace, planned)
        except PluginError as exc:
            return Step(
                planned.plugin,
                planned.action,
                "failed",
                planned.source,
                None,
                started,
                _now(),
                f"{exc.code}: {exc.message}",
                claim.attempt,
            )
        return Step(
            planned.plugin,
            planned.action,
            "succeeded",
            planned.source,
            sha,
            started,
            _now(),
            None,
            claim.attempt,
        )

    async def _install(self, workspace: workspaces.Workspace, planned: PlannedStep) -> str:
        # stage() checks the allowlist itself: every install path passes through it.
        source = parse_source(planned.source, self._config.sources)
        work_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="registry-stage-"))
        try:
            staged = await stage(source, self._config.sources, self._config.limits, work_dir)
            await self._deliver(workspace, planned.plugin, staged)
        finally:
            await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
        # Recorded only now that the bytes are in place (DESIGN lesson 7).
        async with self._pool.acquire() as conn:
            await workspaces.record_installed(
                conn, workspace.id, planned.plugin, planned.source, staged.sha
            )
        return staged.sha

    async def _deliver(
        self, workspace: workspaces.Workspace, name: str, staged: StagedPlugin
    ) -> None:
        if workspace.delivery == "filesystem":
            await deliver_to_filesystem(staged, self._config.plugins_dir, str(workspace.id), name)
            return
        if workspace.url is None:
            raise FetchFailed(
                "http delivery needs the workspace's url; it is set when the runtime registers",
                code="no_workspace_url",
                transient=True,
            )
        await deliver_over_http(
            self._http,
            workspace_url=workspace.url,
            name=name,
            tree=staged.path,
            sha=staged.sha,
            timeout_s=self._config.limits.timeout_s,
        )
