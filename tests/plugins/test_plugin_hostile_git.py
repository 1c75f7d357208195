"""Hostile git sources built object by object: what a checkout would never produce."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.plugins import (
    FetchFailed,
    FetchLimits,
    SourceSettings,
    StagedPlugin,
    parse_source,
    stage,
)
from registry.plugins import fetch as fetch_module
from registry.plugins.fetch import _materialise
from registry.plugins.sources import PluginSource
from tests.plugins.conftest import Repo

ALLOW_ALL = SourceSettings(allowlist=("*",))
LIMITS = FetchLimits(timeout_s=30.0)


def dotdot_commit(repo: Repo) -> str:
    """A commit whose root holds a tree named `..` with `escaped.txt` in it: checked out
    naively, the file lands beside the destination instead of inside it."""
    repo.write("payload", "escaped\n")
    blob = repo.git("hash-object", "-w", "payload")
    repo.remove("payload")
    inner = repo.git_input("mktree", f"100644 blob {blob}\tescaped.txt\n")
    root = repo.git_input("mktree", f"040000 tree {inner}\t..\n100644 blob {blob}\tok.txt\n")
    commit = repo.git("commit-tree", root, "-m", "escape")
    repo.git("update-ref", "refs/heads/main", commit)
    return commit


def escaped(tmp_path: Path) -> list[str]:
    return [str(p) for p in tmp_path.rglob("escaped.txt") if ".git" not in p.parts]


async def test_a_tree_entry_named_dotdot_is_refused_by_fsck_at_fetch(
    make_repo: Callable[[str], Repo], work_dir: Path, tmp_path: Path
) -> None:
    """Mutant: fetch without `transfer.fsckObjects=true`: the object is stored, and only the
    listing's own check stands between it and the disk (the error is then path_escape)."""
    repo = make_repo("evil")
    dotdot_commit(repo)

    with pytest.raises(FetchFailed) as refused:
        await stage(parse_source(f"{repo.source}#main", ALLOW_ALL), ALLOW_ALL, LIMITS, work_dir)

    assert refused.value.code == "object_refused", refused.value.message
    assert "hasDotdot" in refused.value.message
    assert refused.value.transient is False  # fetching it again fetches the same object
    assert os.listdir(work_dir) == []
    assert escaped(tmp_path) == []


async def test_staging_refuses_a_dotdot_entry_already_in_the_object_store(
    make_repo: Callable[[str], Repo], tmp_path: Path
) -> None:
    """Mutant: the tree listing's check without `..`: an object store that holds the tree
    (fsck is one layer, not the only one) writes `escaped.txt` outside the destination."""
    repo = make_repo("evil")
    commit = dotdot_commit(repo)
    dest = tmp_path / "stage" / "plugin"
    dest.mkdir(parents=True)

    with pytest.raises(FetchFailed) as refused:
        await _materialise(repo.path / ".git", commit, None, dest, LIMITS)

    assert refused.value.code == "path_escape"
    assert os.listdir(dest) == []
    assert escaped(tmp_path) == []


async def test_a_ref_that_moves_between_resolve_and_fetch_is_transient(
    make_repo: Callable[[str], Repo], work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutant: `ref_moved` classified permanent: a branch pushed to at the wrong moment would
    fail the reconcile for good instead of being retried (and then staging the new commit)."""
    repo = make_repo("moving")
    repo.write("plugin.json", '{"v": 1}')
    resolved_commit = repo.commit("first")
    resolve = fetch_module._resolve_git

    async def resolve_then_move(source: PluginSource, cwd: Path) -> tuple[str, str | None]:
        resolved = await resolve(source, cwd)
        # Force-pushed meanwhile: the resolved commit is gone from the source entirely.
        repo.write("plugin.json", '{"v": 2}')
        repo.git("add", "-A")
        repo.git("commit", "-q", "--amend", "-m", "rewritten")
        repo.git("reflog", "expire", "--expire=now", "--all")
        repo.git("gc", "-q", "--prune=now")
        return resolved

    monkeypatch.setattr(fetch_module, "_resolve_git", resolve_then_move)
    with pytest.raises(FetchFailed) as moved:
        await stage(parse_source(f"{repo.source}#main", ALLOW_ALL), ALLOW_ALL, LIMITS, work_dir)
    monkeypatch.setattr(fetch_module, "_resolve_git", resolve)
    retried: StagedPlugin = await stage(
        parse_source(f"{repo.source}#main", ALLOW_ALL), ALLOW_ALL, LIMITS, work_dir
    )

    assert moved.value.code == "ref_moved", moved.value.message
    assert moved.value.transient is True
    assert retried.sha == repo.head() != resolved_commit
    assert (retried.path / "plugin.json").read_text() == '{"v": 2}'
    assert os.listdir(work_dir) == [retried.path.name]
