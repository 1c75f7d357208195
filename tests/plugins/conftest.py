"""Fixtures for plugin tests: real local git repositories built on the fly."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.git_daemon import CountingGitDaemon

_GIT_IDENTITY = (
    "-c",
    "user.email=plugins-test@example.com",
    "-c",
    "user.name=Plugins Test",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "tag.gpgsign=false",
    "-c",
    "init.defaultBranch=main",
    "-c",
    "core.symlinks=true",
)


def run_git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    result = subprocess.run(
        ["git", *_GIT_IDENTITY, *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def run_git_input(cwd: Path, stdin: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    result = subprocess.run(
        ["git", *_GIT_IDENTITY, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


class Repo:
    """A non-bare working repository that tests commit into and fetch from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        run_git(path, "init", "-q", "-b", "main")

    @property
    def source(self) -> str:
        return f"git+file://{self.path}"

    def git(self, *args: str) -> str:
        return run_git(self.path, *args)

    def git_input(self, *args: str) -> str:
        """A git command fed `args[-1]` on its stdin."""
        return run_git_input(self.path, args[-1], *args[:-1])

    def write(self, rel: str, content: str | bytes, *, executable: bool = False) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(0o755 if executable else 0o644)

    def remove(self, rel: str) -> None:
        (self.path / rel).unlink()

    def symlink(self, rel: str, points_to: str) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(points_to)

    def commit(self, message: str = "change") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def bare_clone(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        run_git(dest.parent, "clone", "-q", "--bare", str(self.path), str(dest))
        return dest


MakeRepo = Callable[[str], Repo]


@pytest.fixture
def make_repo(tmp_path: Path) -> MakeRepo:
    def factory(name: str) -> Repo:
        return Repo(tmp_path / "repos" / name)

    return factory


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[CountingGitDaemon]:
    """A git server on 127.0.0.1 serving the repositories under tmp_path/served, counting
    its connections."""
    base = tmp_path / "served"
    base.mkdir()
    with CountingGitDaemon(base, tmp_path) as daemon:
        yield daemon
