"""The registry as users install it: a built wheel in a fresh venv, outside the source tree.

Every other test runs the editable source tree, where a file the build leaves out is still on
disk; this one would have caught a wheel without migrations (a `migrate` that applies nothing).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest

from tests.processes import Processes

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of what the Dockerfile copies, not from the worktree
    (setuptools reuses a build/ folder it finds, stale files and all)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("registry", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = work / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, source, cwd=work)
    (built,) = dist.glob("registry-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies installed (from pip's cache, mostly);
    this test's pip drives it, which saves seeding the venv with a pip of its own."""
    venv = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel, cwd=venv)
    return python


def test_the_wheel_carries_every_module_and_every_migration(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    expected = {path.relative_to(ROOT).as_posix() for path in (ROOT / "registry").rglob("*.py")} | {
        f"registry/migrations/{path.name}" for path in (ROOT / "migrations").glob("*.sql")
    }
    # The dashboard's pages are package data too (issue 17).
    expected |= {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "registry" / "ui" / "static").iterdir()
    }

    assert expected - shipped == set()


async def test_migrate_from_an_installed_wheel_applies_every_migration(
    venv_python: Path, empty_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    # Outside the source tree and without the test run's import path, so only the venv's
    # copy of the package can be found.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "REGISTRY_"))}
    process = processes.adopt(
        await asyncio.create_subprocess_exec(
            venv_python,
            "-c",
            "import registry.db.migrate as m; print(m.__file__)",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
    )
    where, _ = await process.communicate()
    assert Path(where.decode().strip()).is_relative_to(venv_python.parents[1])

    process = processes.adopt(
        await asyncio.create_subprocess_exec(
            venv_python,
            "-m",
            "registry",
            "migrate",
            "--dsn",
            empty_dsn,
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()

    conn = await asyncpg.connect(empty_dsn)
    try:
        applied = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    # Read from the source tree directly, not through the loader under test.
    files = sorted(path.name for path in (ROOT / "migrations").glob("*.sql"))
    assert [f"{r['version']:04d}_{r['name']}.sql" for r in applied] == files
