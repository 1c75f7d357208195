"""Resolving and staging plugins from real local git repositories and directories."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.plugins import (
    FetchFailed,
    FetchLimits,
    SourceDenied,
    SourceSettings,
    StagedPlugin,
    default_plugin_name,
    parse_source,
    resolve_version,
    stage,
    tree_digest,
)
from tests.plugins.conftest import MakeRepo, Repo

ALLOW_ALL = SourceSettings(allowlist=("*",))
LIMITS = FetchLimits(timeout_s=30.0)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o100)


@pytest.fixture
def repo(make_repo: MakeRepo) -> Repo:
    r = make_repo("tool")
    r.write("plugin.json", '{"name": "tool"}')
    r.write("bin/run", "#!/bin/sh\necho hi\n", executable=True)
    r.commit("first")
    return r


@pytest.fixture
def silent_server() -> Iterator[int]:
    # Listening but never accepting: the kernel completes the handshake, git sends its
    # request and then waits forever for an answer.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        yield srv.getsockname()[1]


async def _stage(
    raw: str,
    work_dir: Path,
    *,
    settings: SourceSettings = ALLOW_ALL,
    limits: FetchLimits = LIMITS,
) -> StagedPlugin:
    return await stage(parse_source(raw, settings), settings, limits, work_dir)


async def _stage_error(
    raw: str,
    work_dir: Path,
    *,
    settings: SourceSettings = ALLOW_ALL,
    limits: FetchLimits = LIMITS,
) -> FetchFailed:
    with pytest.raises(FetchFailed) as exc_info:
        await _stage(raw, work_dir, settings=settings, limits=limits)
    return exc_info.value


# --------------------------------------------------------------------------- git: happy paths


async def test_stage_branch_returns_head_sha_and_exact_content(repo: Repo, work_dir: Path) -> None:
    staged = await _stage(f"{repo.source}#main", work_dir)
    assert staged.sha == repo.head()
    assert files_under(staged.path) == {
        "bin/run": b"#!/bin/sh\necho hi\n",
        "plugin.json": b'{"name": "tool"}',
    }
    assert is_executable(staged.path / "bin" / "run")
    assert not is_executable(staged.path / "plugin.json")
    assert not (staged.path / ".git").exists()
    assert staged.path.parent == work_dir


async def test_stage_leaves_only_the_staged_tree_in_work_dir(repo: Repo, work_dir: Path) -> None:
    staged = await _stage(f"{repo.source}#main", work_dir)
    assert entries(work_dir) == [staged.path]


async def test_stage_without_ref_uses_remote_head(repo: Repo, work_dir: Path) -> None:
    staged = await _stage(repo.source, work_dir)
    assert staged.sha == repo.head()


async def test_stage_lightweight_tag(repo: Repo, work_dir: Path) -> None:
    tagged = repo.head()
    repo.git("tag", "v1")
    repo.write("plugin.json", "changed")
    repo.commit("second")
    staged = await _stage(f"{repo.source}#v1", work_dir)
    assert staged.sha == tagged
    assert (staged.path / "plugin.json").read_bytes() == b'{"name": "tool"}'


async def test_stage_annotated_tag_returns_peeled_commit(repo: Repo, work_dir: Path) -> None:
    tagged = repo.head()
    repo.git("tag", "-a", "v2", "-m", "release")
    repo.write("plugin.json", "changed")
    repo.commit("second")
    staged = await _stage(f"{repo.source}#v2", work_dir)
    assert staged.sha == tagged
    assert (staged.path / "plugin.json").read_bytes() == b'{"name": "tool"}'


async def test_stage_other_branch(repo: Repo, work_dir: Path) -> None:
    repo.git("checkout", "-q", "-b", "feature")
    repo.write("feature.txt", "f")
    feature = repo.commit("feature")
    repo.git("checkout", "-q", "main")
    staged = await _stage(f"{repo.source}#feature", work_dir)
    assert staged.sha == feature
    assert (staged.path / "feature.txt").read_text() == "f"
    main = await _stage(f"{repo.source}#main", work_dir)
    assert not (main.path / "feature.txt").exists()


async def test_stage_full_sha_of_older_commit(repo: Repo, work_dir: Path) -> None:
    old = repo.head()
    repo.write("plugin.json", "v2")
    repo.commit("second")
    staged = await _stage(f"{repo.source}#{old}", work_dir)
    assert staged.sha == old
    assert (staged.path / "plugin.json").read_bytes() == b'{"name": "tool"}'


async def test_stage_explicit_sha_after_branch_moved_gets_old_content(
    repo: Repo, work_dir: Path
) -> None:
    src = parse_source(f"{repo.source}#main", ALLOW_ALL)
    resolved = await resolve_version(src, ALLOW_ALL, LIMITS)
    assert resolved == repo.head()
    repo.write("plugin.json", "moved on")
    moved = repo.commit("moved on")
    assert moved != resolved

    pinned = await _stage(f"{repo.source}#{resolved}", work_dir)
    assert pinned.sha == resolved
    assert (pinned.path / "plugin.json").read_bytes() == b'{"name": "tool"}'

    latest = await _stage(f"{repo.source}#main", work_dir)
    assert latest.sha == moved
    assert (latest.path / "plugin.json").read_bytes() == b"moved on"


async def test_resolve_version_of_git_branch_and_tag(repo: Repo) -> None:
    first = repo.head()
    repo.git("tag", "-a", "v1", "-m", "release")
    repo.write("x", "x")
    second = repo.commit("second")
    branch = parse_source(f"{repo.source}#main", ALLOW_ALL)
    tag = parse_source(f"{repo.source}#v1", ALLOW_ALL)
    assert await resolve_version(branch, ALLOW_ALL, LIMITS) == second
    assert await resolve_version(tag, ALLOW_ALL, LIMITS) == first


async def test_resolve_version_takes_full_sha_as_is(tmp_path: Path) -> None:
    sha = "ab" * 20
    src = parse_source(f"git+file://{tmp_path}/does-not-exist.git#{sha}", ALLOW_ALL)
    assert await resolve_version(src, ALLOW_ALL, LIMITS) == sha


async def test_stage_skips_generated_files_in_git_tree(repo: Repo, work_dir: Path) -> None:
    repo.write("__pycache__/mod.cpython-311.pyc", b"\x00bytecode")
    repo.write("pkg/__pycache__/x.pyc", b"\x00")
    repo.write("pkg/mod.py", "x = 1\n")
    repo.write("pkg/stale.pyc", b"\x00")
    repo.write("pkg/stale.pyo", b"\x00")
    repo.write("tool.egg-info/PKG-INFO", "Name: tool\n")
    repo.git("add", "-f", "-A")
    repo.commit("generated files")
    staged = await _stage(f"{repo.source}#main", work_dir)
    assert set(files_under(staged.path)) == {"bin/run", "plugin.json", "pkg/mod.py"}


async def test_stage_github_shorthand_subdir_from_local_base(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    mono = make_repo("mono")
    mono.write("README.md", "monorepo")
    mono.write("plugins/fmt/plugin.json", "fmt")
    mono.write("plugins/fmt/lib/util.py", "pass\n")
    mono.write("plugins/other/plugin.json", "other")
    sha = mono.commit("mono")
    base = tmp_path / "fake-github"
    mono.bare_clone(base / "acme" / "mono.git")
    settings = SourceSettings(github_base=f"file://{base}", allowlist=("github://acme/",))

    src = parse_source("github://acme/mono/plugins/fmt#main", settings)
    staged = await stage(src, settings, LIMITS, tmp_path / "work")

    assert default_plugin_name(src) == "fmt"
    assert staged.sha == sha
    assert files_under(staged.path) == {"plugin.json": b"fmt", "lib/util.py": b"pass\n"}


async def test_stage_missing_subdir_is_permanent(make_repo: MakeRepo, tmp_path: Path) -> None:
    mono = make_repo("mono")
    mono.write("plugins/fmt/plugin.json", "fmt")
    mono.commit("mono")
    base = tmp_path / "fake-github"
    mono.bare_clone(base / "acme" / "mono.git")
    settings = SourceSettings(github_base=f"file://{base}", allowlist=("*",))
    error = await _stage_error(
        "github://acme/mono/plugins/nope#main", tmp_path / "work", settings=settings
    )
    assert error.code == "subdir_not_found"
    assert error.transient is False
    assert entries(tmp_path / "work") == []


# --------------------------------------------------------------------------- git: failures


async def test_stage_missing_ref_is_ref_not_found_and_permanent(repo: Repo, work_dir: Path) -> None:
    error = await _stage_error(f"{repo.source}#no-such-branch", work_dir)
    assert error.code == "ref_not_found"
    assert error.transient is False
    assert entries(work_dir) == []


async def test_stage_unknown_sha_is_ref_not_found_and_permanent(repo: Repo, work_dir: Path) -> None:
    error = await _stage_error(f"{repo.source}#{'de' * 20}", work_dir)
    assert error.code == "ref_not_found"
    assert error.transient is False


async def test_resolve_missing_ref_is_ref_not_found(repo: Repo) -> None:
    src = parse_source(f"{repo.source}#nope", ALLOW_ALL)
    with pytest.raises(FetchFailed) as exc_info:
        await resolve_version(src, ALLOW_ALL, LIMITS)
    assert exc_info.value.code == "ref_not_found"


async def test_stage_missing_repository_is_transient(tmp_path: Path, work_dir: Path) -> None:
    error = await _stage_error(f"git+file://{tmp_path}/nowhere.git#main", work_dir)
    assert error.code == "source_unreachable"
    assert error.transient is True
    assert entries(work_dir) == []


async def test_stage_refused_port_is_transient(work_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = await _stage_error(f"git+git://127.0.0.1:{port}/x.git#main", work_dir)
    assert error.code == "source_unreachable"
    assert error.transient is True


async def test_stage_git_symlink_is_refused_and_nothing_staged(repo: Repo, work_dir: Path) -> None:
    repo.symlink("passwd", "/etc/passwd")
    repo.commit("sneaky link")
    error = await _stage_error(f"{repo.source}#main", work_dir)
    assert error.code == "symlink_refused"
    assert error.transient is False
    assert entries(work_dir) == []


async def test_stage_git_submodule_is_refused(repo: Repo, work_dir: Path) -> None:
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{repo.head()},vendored")
    repo.git("commit", "-q", "-m", "gitlink")
    error = await _stage_error(f"{repo.source}#main", work_dir)
    assert error.code == "submodule_refused"
    assert entries(work_dir) == []


async def test_stage_git_tree_over_byte_limit_is_too_large(repo: Repo, work_dir: Path) -> None:
    repo.write("big.bin", b"x" * 10_000)
    repo.commit("big")
    error = await _stage_error(f"{repo.source}#main", work_dir, limits=FetchLimits(max_bytes=5_000))
    assert error.code == "tree_too_large"
    assert error.transient is False
    assert entries(work_dir) == []


async def test_stage_git_tree_over_file_limit_is_too_large(repo: Repo, work_dir: Path) -> None:
    for i in range(5):
        repo.write(f"f{i}.txt", str(i))
    repo.commit("many")
    error = await _stage_error(f"{repo.source}#main", work_dir, limits=FetchLimits(max_files=3))
    assert error.code == "tree_too_large"


async def test_stage_unresponsive_server_times_out_transiently(
    silent_server: int, work_dir: Path
) -> None:
    started = time.monotonic()
    error = await _stage_error(
        f"git+git://127.0.0.1:{silent_server}/x.git#main",
        work_dir,
        limits=FetchLimits(timeout_s=0.5),
    )
    assert error.code == "fetch_timeout"
    assert error.transient is True
    assert time.monotonic() - started < 10
    assert entries(work_dir) == []


async def test_resolve_unresponsive_server_times_out_transiently(silent_server: int) -> None:
    src = parse_source(f"git+git://127.0.0.1:{silent_server}/x.git#main", ALLOW_ALL)
    with pytest.raises(FetchFailed) as exc_info:
        await resolve_version(src, ALLOW_ALL, FetchLimits(timeout_s=0.5))
    assert exc_info.value.code == "fetch_timeout"
    assert exc_info.value.transient is True


async def test_stage_checks_allowlist_before_touching_anything(repo: Repo, work_dir: Path) -> None:
    settings = SourceSettings(allowlist=("git+file:///somewhere/else/",))
    src = parse_source(f"{repo.source}#main", settings)
    with pytest.raises(SourceDenied):
        await stage(src, settings, LIMITS, work_dir)
    with pytest.raises(SourceDenied):
        await resolve_version(src, settings, LIMITS)
    assert entries(work_dir) == []


async def test_stage_allowed_by_git_file_prefix(repo: Repo, tmp_path: Path, work_dir: Path) -> None:
    settings = SourceSettings(allowlist=(f"git+file://{tmp_path}/repos/",))
    staged = await _stage(f"{repo.source}#main", work_dir, settings=settings)
    assert staged.sha == repo.head()


# --------------------------------------------------------------------------- file sources


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    root = tmp_path / "srv" / "linter"
    (root / "lib").mkdir(parents=True)
    (root / "plugin.json").write_text("{}")
    (root / "lib" / "rules.py").write_text("RULES = []\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o755)
    return root


async def test_stage_file_source_copies_tree_and_returns_digest(
    plugin_dir: Path, work_dir: Path
) -> None:
    (plugin_dir / "__pycache__").mkdir()
    (plugin_dir / "__pycache__" / "x.pyc").write_bytes(b"\x00")
    (plugin_dir / "lib" / "rules.pyc").write_bytes(b"\x00")
    staged = await _stage(f"file://{plugin_dir}", work_dir)
    assert staged.sha == tree_digest(plugin_dir)
    assert files_under(staged.path) == {
        "plugin.json": b"{}",
        "lib/rules.py": b"RULES = []\n",
        "run.sh": b"#!/bin/sh\n",
    }
    assert is_executable(staged.path / "run.sh")
    assert tree_digest(staged.path) == staged.sha


async def test_resolve_version_of_file_source_is_tree_digest(plugin_dir: Path) -> None:
    src = parse_source(f"file://{plugin_dir}", ALLOW_ALL)
    assert await resolve_version(src, ALLOW_ALL, LIMITS) == tree_digest(plugin_dir)


async def test_stage_file_source_with_symlink_is_refused(plugin_dir: Path, work_dir: Path) -> None:
    (plugin_dir / "lib" / "escape").symlink_to("/etc")
    error = await _stage_error(f"file://{plugin_dir}", work_dir)
    assert error.code == "symlink_refused"
    assert entries(work_dir) == []


async def test_stage_file_source_over_limits_is_too_large(plugin_dir: Path, work_dir: Path) -> None:
    (plugin_dir / "blob.bin").write_bytes(b"x" * 10_000)
    too_big = await _stage_error(
        f"file://{plugin_dir}", work_dir, limits=FetchLimits(max_bytes=5_000)
    )
    too_many = await _stage_error(f"file://{plugin_dir}", work_dir, limits=FetchLimits(max_files=2))
    assert too_big.code == too_many.code == "tree_too_large"
    assert entries(work_dir) == []


async def test_stage_missing_file_source_is_transient(tmp_path: Path, work_dir: Path) -> None:
    error = await _stage_error(f"file://{tmp_path}/absent", work_dir)
    assert error.code == "source_unreachable"
    assert error.transient is True
    assert entries(work_dir) == []


async def test_stage_file_source_fifo_is_refused(plugin_dir: Path, work_dir: Path) -> None:
    os.mkfifo(plugin_dir / "pipe")
    error = await _stage_error(f"file://{plugin_dir}", work_dir)
    assert error.code == "unsupported_file_type"
    assert entries(work_dir) == []


async def test_stage_falls_back_to_ref_when_server_refuses_sha(
    repo: Repo, work_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Protocol v0 upload-pack refuses wants for unadvertised objects such as the commit
    # under an annotated tag, which forces the fetch-the-ref-and-verify path.
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[protocol]\n\tversion = 0\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    tagged = repo.head()
    repo.git("tag", "-a", "v1", "-m", "release")
    repo.write("plugin.json", "later")
    repo.commit("later")
    staged = await _stage(f"{repo.source}#v1", work_dir)
    assert staged.sha == tagged
    assert (staged.path / "plugin.json").read_bytes() == b'{"name": "tool"}'


async def test_cancelled_stage_kills_git_and_cleans_up(silent_server: int, work_dir: Path) -> None:
    task = asyncio.create_task(_stage(f"git+git://127.0.0.1:{silent_server}/x.git#main", work_dir))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entries(work_dir) == []


# --------------------------------------------------------------------------- git: isolation


async def test_stage_ignores_insteadof_in_the_service_users_gitconfig(
    repo: Repo, make_repo: MakeRepo, tmp_path: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service user's ~/.gitconfig would redirect the allowlisted source to another repo.
    elsewhere = make_repo("elsewhere")
    elsewhere.write("plugin.json", '{"name": "impostor"}')
    elsewhere.commit("impostor")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        f'[url "file://{elsewhere.path}"]\n\tinsteadOf = file://{repo.path}\n', encoding="utf-8"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))

    staged = await _stage(f"{repo.source}#main", work_dir)

    assert staged.sha == repo.head()
    assert files_under(staged.path)["plugin.json"] == b'{"name": "tool"}'
