"""The on-disk tree cache: one fetch per (source, commit), never a damaged or partial entry."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from registry.plugins import FetchLimits, StagedPlugin, parse_source, stage, tree_digest
from registry.plugins.fetch import Pinned
from registry.plugins.sources import SourceSettings
from registry.plugins.tree_cache import TreeCache, TreeKey
from tests.plugins.conftest import MakeRepo, Repo

SETTINGS = SourceSettings(allowlist=("*",))
LIMITS = FetchLimits(timeout_s=20.0)
IDLE_S = 600.0
WITHIN_S = 10.0


class Clock:
    """Wall time as the cache sees it, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class CountedFetch:
    """Stages a real git commit, counting how often the cache asks for it."""

    def __init__(self, repo: Repo, gate: asyncio.Event | None = None) -> None:
        self.source = parse_source(f"{repo.source}#main", SETTINGS)
        self.pinned = Pinned(repo.head(), "refs/heads/main")
        self.key = TreeKey(self.source.location, None, self.pinned.sha)
        self.calls = 0
        self._gate = gate

    async def __call__(self, into: Path) -> StagedPlugin:
        self.calls += 1
        if self._gate is not None:
            await self._gate.wait()
        return await stage(self.source, SETTINGS, LIMITS, into, pinned=self.pinned)


def files_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def committed(make_repo: MakeRepo, name: str, files: dict[str, str]) -> Repo:
    repo = make_repo(name)
    for rel, content in files.items():
        repo.write(rel, content)
    repo.commit()
    return repo


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, clock: Clock) -> TreeCache:
    return TreeCache(tmp_path / "cache", idle_s=IDLE_S, max_bytes=10_000, clock=clock)


@pytest.fixture
def plugin(make_repo: MakeRepo) -> Repo:
    return committed(make_repo, "tool", {"main.py": "print('v1')\n", "lib/util.py": "x = 1\n"})


EXPECTED = {"main.py": "print('v1')\n", "lib/util.py": "x = 1\n"}


async def test_second_checkout_is_a_private_copy_served_without_fetching(
    cache: TreeCache, plugin: Repo, work_dir: Path
) -> None:
    fetch = CountedFetch(plugin)

    first = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    second = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)

    assert fetch.calls == 1
    assert first.path != second.path
    assert files_under(first.path) == files_under(second.path) == EXPECTED
    assert first.sha == second.sha == fetch.pinned.sha
    assert first.digest == second.digest == tree_digest(second.path)
    # The copies are the caller's: consuming one leaves the cached tree intact.
    (first.path / "main.py").unlink()
    third = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    assert (fetch.calls, files_under(third.path)) == (1, EXPECTED)


async def test_an_altered_cached_file_is_never_served_and_the_tree_is_fetched_again(
    cache: TreeCache, plugin: Repo, work_dir: Path
) -> None:
    fetch = CountedFetch(plugin)
    await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    cached = cache.root / fetch.key.name / "tree" / "main.py"
    cached.write_text("print('tampered')\n")

    again = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)

    assert fetch.calls == 2
    assert files_under(again.path) == EXPECTED


async def test_a_truncated_cached_file_is_never_served(
    cache: TreeCache, plugin: Repo, work_dir: Path
) -> None:
    fetch = CountedFetch(plugin)
    await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    os.truncate(cache.root / fetch.key.name / "tree" / "lib" / "util.py", 2)

    again = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)

    assert (fetch.calls, files_under(again.path)) == (2, EXPECTED)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda meta: meta.unlink(), id="record-missing"),
        pytest.param(lambda meta: meta.write_bytes(meta.read_bytes()[:10]), id="record-truncated"),
        pytest.param(
            lambda meta: meta.write_bytes(
                orjson.dumps({**orjson.loads(meta.read_bytes()), "key": {"sha": "0" * 40}})
            ),
            id="record-of-another-key",
        ),
    ],
)
async def test_an_entry_without_a_valid_record_is_never_used(
    cache: TreeCache,
    plugin: Repo,
    work_dir: Path,
    damage: Callable[[Path], object],
) -> None:
    fetch = CountedFetch(plugin)
    await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    # What a half-written entry would look like, had it been written in place.
    damage(cache.root / fetch.key.name / "entry.json")

    again = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)

    assert (fetch.calls, files_under(again.path)) == (2, EXPECTED)


async def test_a_fill_a_crash_left_behind_is_never_used_and_is_swept_once_idle(
    cache: TreeCache, clock: Clock, plugin: Repo, work_dir: Path
) -> None:
    fetch = CountedFetch(plugin)
    await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    entry = cache.root / fetch.key.name
    # A process died between writing its tree and renaming it into place.
    leftover = cache.root / ".tree-incoming-dead"
    entry.rename(leftover)
    (leftover / "tree" / "main.py").write_text("print('half')\n")

    again = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)
    assert (fetch.calls, files_under(again.path)) == (2, EXPECTED)

    os.utime(leftover, (clock.now, clock.now))
    clock.now += IDLE_S + 1
    await cache.sweep()
    assert not leftover.exists()


async def test_concurrent_checkouts_of_one_tree_share_one_fetch(
    cache: TreeCache, plugin: Repo, work_dir: Path
) -> None:
    gate = asyncio.Event()
    fetch = CountedFetch(plugin, gate)
    n = 8

    checkouts = [
        asyncio.ensure_future(cache.checkout(fetch.key, fetch, work_dir, LIMITS)) for _ in range(n)
    ]
    # The fetch is held until every other checkout waits for it, or (without single flight)
    # until every checkout has started a fetch of its own.
    deadline = time.monotonic() + WITHIN_S
    while cache.waiting(fetch.key) < n - 1 and fetch.calls < n:
        assert time.monotonic() < deadline, (cache.waiting(fetch.key), fetch.calls)
        await asyncio.sleep(0.005)
    gate.set()
    staged = await asyncio.gather(*checkouts)

    assert fetch.calls == 1
    assert len({s.path for s in staged}) == n
    assert all(files_under(s.path) == EXPECTED for s in staged)


async def test_a_cancelled_fill_is_taken_over_by_a_waiting_checkout(
    cache: TreeCache, plugin: Repo, work_dir: Path
) -> None:
    gate = asyncio.Event()
    fetch = CountedFetch(plugin, gate)
    deadline = time.monotonic() + WITHIN_S
    leader = asyncio.ensure_future(cache.checkout(fetch.key, fetch, work_dir, LIMITS))
    while fetch.calls < 1:  # the leader is fetching, held at the gate
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    follower = asyncio.ensure_future(cache.checkout(fetch.key, fetch, work_dir, LIMITS))
    while cache.waiting(fetch.key) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)

    leader.cancel()
    gate.set()
    staged = await follower

    assert leader.cancelled()
    assert fetch.calls == 2
    assert files_under(staged.path) == EXPECTED
    assert [p.name for p in cache.root.iterdir()] == [fetch.key.name]


async def _fill(cache: TreeCache, fetch: CountedFetch, work_dir: Path) -> None:
    await cache.checkout(fetch.key, fetch, work_dir, LIMITS)


def entries(cache: TreeCache) -> set[str]:
    return {p.name for p in cache.root.iterdir()}


async def test_entries_unused_for_the_idle_time_are_evicted(
    cache: TreeCache, clock: Clock, make_repo: MakeRepo, work_dir: Path
) -> None:
    old = CountedFetch(committed(make_repo, "old", {"a.py": "a\n"}))
    used = CountedFetch(committed(make_repo, "used", {"b.py": "b\n"}))
    new = CountedFetch(committed(make_repo, "new", {"c.py": "c\n"}))
    await _fill(cache, old, work_dir)
    await _fill(cache, used, work_dir)
    clock.now += IDLE_S / 2
    await _fill(cache, used, work_dir)  # a use: idle time starts again

    clock.now += IDLE_S / 2 + 1
    await _fill(cache, new, work_dir)

    assert entries(cache) == {used.key.name, new.key.name}
    await _fill(cache, old, work_dir)
    assert (old.calls, used.calls, new.calls) == (2, 1, 1)


async def test_least_recently_used_entries_go_when_over_the_byte_cap(
    tmp_path: Path, clock: Clock, make_repo: MakeRepo, work_dir: Path
) -> None:
    # Three trees of 100 bytes in a cache of 250: the third evicts the least recently used.
    cache = TreeCache(tmp_path / "cache", idle_s=IDLE_S, max_bytes=250, clock=clock)
    first, second, third = (
        CountedFetch(committed(make_repo, name, {"data.txt": name[0] * 100}))
        for name in ("first", "second", "third")
    )
    await _fill(cache, first, work_dir)
    clock.now += 1
    await _fill(cache, second, work_dir)
    clock.now += 1
    await _fill(cache, first, work_dir)  # first is now the more recently used
    clock.now += 1

    await _fill(cache, third, work_dir)

    assert entries(cache) == {first.key.name, third.key.name}
    assert (first.calls, second.calls, third.calls) == (1, 1, 1)


async def test_a_tree_larger_than_the_cache_is_delivered_but_not_kept(
    tmp_path: Path, clock: Clock, make_repo: MakeRepo, work_dir: Path
) -> None:
    cache = TreeCache(tmp_path / "cache", idle_s=IDLE_S, max_bytes=50, clock=clock)
    big = CountedFetch(committed(make_repo, "big", {"data.txt": "x" * 100}))

    staged = await cache.checkout(big.key, big, work_dir, LIMITS)

    assert files_under(staged.path) == {"data.txt": "x" * 100}
    assert entries(cache) == set()


async def test_the_sweep_leaves_what_is_not_its_own_in_a_shared_directory(
    cache: TreeCache, clock: Clock, plugin: Repo, work_dir: Path
) -> None:
    fetch = CountedFetch(plugin)
    await _fill(cache, fetch, work_dir)
    foreign = cache.root / "registry-stage-abc"
    foreign.mkdir()
    os.utime(foreign, (clock.now - 10 * IDLE_S, clock.now - 10 * IDLE_S))

    clock.now += IDLE_S + 1
    await cache.sweep()

    assert entries(cache) == {"registry-stage-abc"}


async def test_a_cache_that_cannot_be_written_still_delivers_the_tree(
    tmp_path: Path, clock: Clock, plugin: Repo, work_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    cache = TreeCache(blocked, idle_s=IDLE_S, max_bytes=10_000, clock=clock)
    fetch = CountedFetch(plugin)

    staged = await cache.checkout(fetch.key, fetch, work_dir, LIMITS)

    assert files_under(staged.path) == EXPECTED
    assert "cannot be filled" in caplog.text
