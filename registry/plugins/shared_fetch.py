"""Resolving and staging plugins for many runs at once: one resolution, one fetch per tree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from registry.plugins.errors import FetchFailed
from registry.plugins.fetch import (
    FetchLimits,
    Pinned,
    StagedPlugin,
    resolve_pinned,
    resolve_version,
    stage,
)
from registry.plugins.resolutions import Resolutions
from registry.plugins.sources import PluginSource, SourceSettings, check_allowed
from registry.plugins.tree_cache import TreeCache, TreeKey

__all__ = ["Asked", "SharedFetcher"]

# A stamp no request is older than: a resolution made without a claim time is never shared.
_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Asked:
    """On whose behalf a run resolves: its latest request and its claim (database times)."""

    requested_at: datetime | None
    claimed_at: datetime | None


class SharedFetcher:
    """resolve_version and stage for the reconcile runner, shared across its runs.

    Git sources go through the shared resolutions (see Resolutions) and the tree cache (see
    TreeCache; None: every run fetches). File sources are local copies that cost no
    connection and are read afresh each time, as before. ``share=False`` is every run
    resolving and fetching for itself, kept to measure what sharing buys (bench.fanout).
    """

    def __init__(
        self,
        sources: SourceSettings,
        limits: FetchLimits,
        cache: TreeCache | None,
        resolutions: Resolutions | None = None,
        *,
        share: bool = True,
    ) -> None:
        self._sources = sources
        self._limits = limits
        self._cache = cache
        self._resolutions = resolutions or Resolutions()
        self._share = share

    async def version(self, source: PluginSource, asked: Asked) -> str:
        """The version ``stage`` would install for this run."""
        if source.kind == "file" or not self._share:
            return await resolve_version(source, self._sources, self._limits)
        return (await self._pin(source, asked)).sha

    async def stage(self, source: PluginSource, work_dir: Path, asked: Asked) -> StagedPlugin:
        """A staged tree of ``source`` under ``work_dir``, the caller's to consume."""
        if source.kind == "file" or not self._share:
            return await stage(source, self._sources, self._limits, work_dir)
        pinned = await self._pin(source, asked)

        async def fetch(into: Path) -> StagedPlugin:
            return await stage(source, self._sources, self._limits, into, pinned=pinned)

        try:
            if self._cache is None:
                return await fetch(work_dir)
            key = TreeKey(source.location, source.subdir, pinned.sha)
            return await self._cache.checkout(key, fetch, work_dir, self._limits)
        except FetchFailed as exc:
            if exc.code == "ref_moved":
                # The ref moved between resolving and fetching; the retry must resolve again.
                self._resolutions.forget(_resolution_key(source), pinned)
            raise

    async def _pin(self, source: PluginSource, asked: Asked) -> Pinned:
        # A shared answer skips resolve_pinned, and with it the allowlist check it makes.
        check_allowed(source, self._sources)
        return await self._resolutions.resolve(
            _resolution_key(source),
            lambda: resolve_pinned(source, self._sources, self._limits),
            requested_at=asked.requested_at,
            started_at=asked.claimed_at or _NEVER,
        )


def _resolution_key(source: PluginSource) -> str:
    # The subdirectory does not change what the ref points at: sources differing only in it
    # share a resolution.
    return f"{source.location}\0{source.ref or 'HEAD'}"
