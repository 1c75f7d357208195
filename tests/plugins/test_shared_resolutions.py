"""Shared ref resolutions, counted at a real git server: one ls-remote answers a fan-out."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.git_daemon import CountingGitDaemon
from registry.plugins import FetchFailed, FetchLimits, PluginSource, parse_source
from registry.plugins.fetch import Pinned, resolve_pinned
from registry.plugins.resolutions import Resolutions
from registry.plugins.shared_fetch import Asked, SharedFetcher
from registry.plugins.sources import SourceSettings
from tests.plugins.conftest import MakeRepo, Repo

LIMITS = FetchLimits(timeout_s=20.0)
REQUESTED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
WITHIN_S = 10.0


def at(seconds: float) -> datetime:
    return REQUESTED + timedelta(seconds=seconds)


@pytest.fixture
def served(git_daemon: CountingGitDaemon) -> Repo:
    repo = Repo(git_daemon.base / "tool")
    repo.write("main.py", "print('v1')\n")
    repo.commit("v1")
    return repo


@pytest.fixture
def sources(git_daemon: CountingGitDaemon) -> SourceSettings:
    return SourceSettings(allowlist=(git_daemon.allow_prefix,))


@pytest.fixture
def source(git_daemon: CountingGitDaemon, sources: SourceSettings) -> PluginSource:
    return parse_source(f"git+{git_daemon.url('tool')}#main", sources)


async def test_runs_asked_before_a_resolution_started_share_it(
    git_daemon: CountingGitDaemon, served: Repo, sources: SourceSettings, source: PluginSource
) -> None:
    fetcher = SharedFetcher(sources, LIMITS, cache=None)

    # Three runs of one fan-out (one request time), claimed one after the other.
    versions = [
        await fetcher.version(source, Asked(requested_at=REQUESTED, claimed_at=at(n)))
        for n in (1, 2, 3)
    ]

    assert versions == [served.head()] * 3
    assert git_daemon.connections() == 1


async def test_a_request_made_after_the_resolution_started_resolves_again(
    git_daemon: CountingGitDaemon, served: Repo, sources: SourceSettings, source: PluginSource
) -> None:
    fetcher = SharedFetcher(sources, LIMITS, cache=None)
    first = await fetcher.version(source, Asked(requested_at=REQUESTED, claimed_at=at(1)))
    served.write("main.py", "print('v2')\n")
    moved = served.commit("v2")

    # The next plugin update, requested after the first resolution started.
    second = await fetcher.version(source, Asked(requested_at=at(1.5), claimed_at=at(2)))

    assert (first, second) == (served.git("rev-parse", "HEAD~1"), moved)
    assert git_daemon.connections() == 2


async def test_a_run_without_a_request_time_never_takes_a_shared_answer(
    git_daemon: CountingGitDaemon, served: Repo, sources: SourceSettings, source: PluginSource
) -> None:
    fetcher = SharedFetcher(sources, LIMITS, cache=None)
    await fetcher.version(source, Asked(requested_at=REQUESTED, claimed_at=at(1)))

    await fetcher.version(source, Asked(requested_at=None, claimed_at=at(2)))

    assert git_daemon.connections() == 2


async def test_concurrent_runs_share_one_ls_remote(
    git_daemon: CountingGitDaemon, served: Repo, sources: SourceSettings, source: PluginSource
) -> None:
    resolutions = Resolutions()
    gate = asyncio.Event()
    calls = 0
    n = 8

    async def resolve() -> Pinned:
        nonlocal calls
        calls += 1
        await gate.wait()
        return await resolve_pinned(source, sources, LIMITS)

    running = [
        asyncio.ensure_future(
            resolutions.resolve("tool", resolve, requested_at=REQUESTED, started_at=at(n))
        )
        for n in range(1, n + 1)
    ]
    # Held until the others wait for the first, or (without single flight) all resolve.
    deadline = time.monotonic() + WITHIN_S
    while resolutions.waiting("tool") < n - 1 and calls < n:
        assert time.monotonic() < deadline, (resolutions.waiting("tool"), calls)
        await asyncio.sleep(0.005)
    gate.set()
    pinned = await asyncio.gather(*running)

    assert calls == 1
    assert {p.sha for p in pinned} == {served.head()}
    assert git_daemon.connections() == 1


async def test_a_run_asked_after_a_resolution_in_flight_started_does_not_join_it(
    served: Repo, sources: SourceSettings, source: PluginSource
) -> None:
    resolutions = Resolutions()
    gate = asyncio.Event()
    calls = 0

    async def resolve() -> Pinned:
        nonlocal calls
        calls += 1
        await gate.wait()
        return await resolve_pinned(source, sources, LIMITS)

    early = asyncio.ensure_future(
        resolutions.resolve("tool", resolve, requested_at=REQUESTED, started_at=at(1))
    )
    deadline = time.monotonic() + WITHIN_S
    while calls < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    late = asyncio.ensure_future(
        resolutions.resolve("tool", resolve, requested_at=at(2), started_at=at(3))
    )
    while calls < 2:
        assert time.monotonic() < deadline, calls
        await asyncio.sleep(0.005)
    gate.set()
    await asyncio.gather(early, late)

    assert calls == 2


async def test_a_retry_after_the_ref_moved_resolves_again_instead_of_reusing_the_answer(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    repo = make_repo("moving")
    repo.write("plugin.json", '{"v": 1}')
    repo.commit("first")
    allow_all = SourceSettings(allowlist=("*",))
    source = parse_source(f"{repo.source}#main", allow_all)
    fetcher = SharedFetcher(allow_all, LIMITS, cache=None)
    asked = Asked(requested_at=REQUESTED, claimed_at=at(1))
    await fetcher.version(source, asked)  # the refresh step resolves
    # Force-pushed before the install fetched: the resolved commit is gone from the source.
    repo.write("plugin.json", '{"v": 2}')
    repo.git("add", "-A")
    repo.git("commit", "-q", "--amend", "-m", "rewritten")
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")

    with pytest.raises(FetchFailed) as moved:
        await fetcher.stage(source, work_dir, asked)
    # The run's retry: the same request, a later claim.
    retried = await fetcher.stage(source, work_dir, Asked(requested_at=REQUESTED, claimed_at=at(5)))

    assert (moved.value.code, moved.value.transient) == ("ref_moved", True)
    assert retried.sha == repo.head()
    assert (retried.path / "plugin.json").read_text() == '{"v": 2}'
