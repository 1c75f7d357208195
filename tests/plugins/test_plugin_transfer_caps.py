"""The fetch caps hold while git transfers, not after: real local repositories, real git."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.disk import peak_bytes_under
from registry.plugins import FetchFailed, FetchLimits, SourceSettings, parse_source, stage
from registry.plugins.transfer import TransferCaps, TransferWatch, limit_writes
from tests.plugins.conftest import MakeRepo, Repo
from tests.plugins.git_http import git_http_server

ALLOW_ALL = SourceSettings(allowlist=("*",))
MIB = 1024 * 1024
# 1 MiB of tree, a hundred files: the transfer may take about 1.1 MiB.
SMALL = FetchLimits(max_bytes=MIB, max_files=100, timeout_s=30.0)
SMALL_CAPS = TransferCaps.for_tree(SMALL.max_bytes, SMALL.max_files)


def random_repo(make_repo: MakeRepo, name: str, sizes: dict[str, int]) -> Repo:
    """Incompressible blobs, so what git transfers is as large as the tree."""
    repo = make_repo(name)
    for path, size in sizes.items():
        repo.write(path, os.urandom(size))
    repo.commit("blobs")
    return repo


def left_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def files_of(tree: Path) -> dict[str, int]:
    return {str(p.relative_to(tree)): p.stat().st_size for p in tree.rglob("*") if p.is_file()}


async def stage_error(repo: Repo, work_dir: Path, limits: FetchLimits) -> FetchFailed:
    with pytest.raises(FetchFailed) as raised:
        await stage(parse_source(f"{repo.source}#main", ALLOW_ALL), ALLOW_ALL, limits, work_dir)
    return raised.value


async def test_a_repository_over_the_byte_cap_is_stopped_during_the_transfer(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    repo = random_repo(make_repo, "huge", {"blob.bin": 6 * MIB})

    with peak_bytes_under(work_dir) as peak:
        error = await stage_error(repo, work_dir, SMALL)

    # Only the transfer's own cap says fetch_too_large; a download completed and measured
    # afterwards would say tree_too_large, with all 6 MiB on disk meanwhile.
    assert (error.code, error.transient) == ("fetch_too_large", False)
    assert str(SMALL_CAPS.file_bytes) in error.message
    assert peak.samples > 0
    assert peak.bytes <= SMALL_CAPS.store_bytes < 2 * MIB
    assert left_in(work_dir) == []


async def test_many_small_blobs_over_the_byte_cap_are_stopped_too(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    # Each blob is far below the per-file limit; together they are the one pack that is not.
    repo = random_repo(make_repo, "many-blobs", {f"b{i}.bin": 256 * 1024 for i in range(24)})

    with peak_bytes_under(work_dir) as peak:
        error = await stage_error(repo, work_dir, SMALL)

    assert (error.code, error.transient) == ("fetch_too_large", False)
    assert peak.bytes <= SMALL_CAPS.store_bytes
    assert left_in(work_dir) == []


async def test_a_pack_of_more_objects_than_the_file_cap_allows_is_stopped(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    repo = make_repo("many-files")
    for i in range(300):
        repo.write(f"f{i:03}.txt", f"{i}\n")
    repo.commit("many")
    limits = FetchLimits(max_bytes=50 * MIB, max_files=20, timeout_s=30.0)
    caps = TransferCaps.for_tree(limits.max_bytes, limits.max_files)

    error = await stage_error(repo, work_dir, limits)

    assert (error.code, error.transient) == ("fetch_too_large", False)
    assert f"more than {caps.objects}" in error.message
    assert left_in(work_dir) == []


async def test_a_tree_filling_its_caps_exactly_still_stages(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    # max_files files, each in a directory of its own, and max_bytes of incompressible data:
    # the most a tree may be. The transfer's margin must let it through.
    sizes = {f"d{i:03}/f.bin": SMALL.max_bytes // SMALL.max_files for i in range(100)}
    sizes["d000/f.bin"] += SMALL.max_bytes % SMALL.max_files
    repo = random_repo(make_repo, "exact", sizes)

    staged = await stage(parse_source(f"{repo.source}#main", ALLOW_ALL), ALLOW_ALL, SMALL, work_dir)

    assert staged.sha == repo.head()
    assert files_of(staged.path) == sizes
    assert left_in(work_dir) == [staged.path]


async def test_one_byte_over_the_tree_cap_is_still_the_trees_verdict(
    make_repo: MakeRepo, work_dir: Path
) -> None:
    # Within the transfer's margin: fetched, then refused by the tree's own check.
    repo = random_repo(make_repo, "just-over", {"blob.bin": SMALL.max_bytes + 1})

    error = await stage_error(repo, work_dir, SMALL)

    assert (error.code, error.transient) == ("tree_too_large", False)
    assert left_in(work_dir) == []


_WRITER = """
import itertools, os, sys
# Small files, each far below any per-file limit: only a watcher of the total stops this.
for i in itertools.count():
    with open(os.path.join(sys.argv[1], f"f{i}"), "wb") as f:
        f.write(b"x" * 65536)
"""


async def test_the_watcher_kills_the_process_group_of_a_writer_over_the_store_cap(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    caps = TransferCaps(file_bytes=MIB, store_bytes=MIB, objects=10)
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(root), start_new_session=True
    )
    watch = TransferWatch(root, caps)
    try:
        async with asyncio.timeout(30):
            await watch.run(writer.pid)
            returncode = await writer.wait()
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()

    assert returncode == -9
    assert watch.stopped is not None and f"more than {caps.store_bytes}" in watch.stopped
    assert watch.verdict(returncode) == watch.stopped


def test_caps_leave_room_for_a_tree_that_fits_and_little_more() -> None:
    caps = TransferCaps.for_tree(50 * MIB, 10_000)

    assert caps.objects == 2 * 10_000 + 64
    assert 50 * MIB < caps.file_bytes < caps.store_bytes < 55 * MIB


def test_the_file_size_limit_stops_a_child_at_the_cap(tmp_path: Path) -> None:
    """The limit git runs under, seen from a plain child: it is stopped at the cap's byte."""
    target = tmp_path / "f"
    with target.open("wb") as out:
        result = subprocess.run(
            ["head", "-c", "5000", "/dev/zero"],
            stdout=out,
            preexec_fn=limit_writes(4096),
            check=False,
        )

    assert result.returncode == -25  # SIGXFSZ: the writer is stopped at the cap
    assert target.stat().st_size == 4096


async def test_over_http_the_transfer_is_stopped_at_the_cap_too(
    make_repo: MakeRepo, tmp_path: Path, work_dir: Path
) -> None:
    # Smart HTTP: git-remote-http and the index-pack it starts run under the same limit.
    repo = random_repo(make_repo, "huge", {"blob.bin": 6 * MIB})
    served = tmp_path / "served"
    repo.bare_clone(served / "huge.git")

    async with git_http_server(served) as base:
        fits = random_repo(make_repo, "small", {"blob.bin": 4096})
        fits.bare_clone(served / "small.git")
        staged = await stage(
            parse_source(f"git+{base}/small.git#main", ALLOW_ALL), ALLOW_ALL, SMALL, work_dir
        )
        with peak_bytes_under(work_dir) as peak, pytest.raises(FetchFailed) as raised:
            await stage(
                parse_source(f"git+{base}/huge.git#main", ALLOW_ALL), ALLOW_ALL, SMALL, work_dir
            )

    assert staged.sha == fits.head()
    assert (raised.value.code, raised.value.transient) == ("fetch_too_large", False)
    assert peak.bytes <= SMALL_CAPS.store_bytes + 4096 * 2
    assert left_in(work_dir) == [staged.path]
