"""The README's quick start holds: `scripts/serve` reinstalls only when it must, and the
development admin token survives restarts so a running client is not logged out."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp

from registry.dev_token import development_token, read_development_token, token_path
from tests.processes import Processes, RegistryProcess

ROOT = Path(__file__).resolve().parents[1]


def test_the_development_token_is_made_once_and_only_its_owner_can_read_it(
    tmp_path: Path,
) -> None:
    first, made = development_token(tmp_path / "data")
    again, made_again = development_token(tmp_path / "data")

    assert made and not made_again
    assert again == first
    assert stat.S_IMODE(token_path(tmp_path / "data").stat().st_mode) == 0o600
    assert list((tmp_path / "data").iterdir()) == [token_path(tmp_path / "data")]


def test_a_file_that_holds_no_token_is_replaced(tmp_path: Path) -> None:
    token_path(tmp_path).write_text("")

    token, made = development_token(tmp_path)

    assert made
    assert read_development_token(tmp_path) == token


async def test_registries_starting_at_once_on_one_data_dir_agree_on_the_token(
    tmp_path: Path,
) -> None:
    code = (
        "import sys; from pathlib import Path; from registry.dev_token import development_token;"
        "print(development_token(Path(sys.argv[1]))[0])"
    )
    starts = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, str(tmp_path), stdout=subprocess.PIPE
        )
        for _ in range(8)
    ]
    tokens = {(await each.communicate())[0].decode().strip() for each in starts}

    assert tokens == {read_development_token(tmp_path)}


async def _list_workspaces(registry: RegistryProcess, token: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{registry.url}/workspaces", headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        return answer.status


async def test_a_restarted_development_registry_keeps_its_admin_token_and_the_cli_finds_it(
    empty_dsn: str, tmp_path: Path, processes: Processes
) -> None:
    unset = {"REGISTRY_ADMIN_TOKEN": ""}
    first = processes.registry(empty_dsn, tmp_path, env=unset)
    await first.wait_healthy()
    token = read_development_token(tmp_path / "data")
    assert token is not None and token in first.log()
    assert await _list_workspaces(first, token) == 200
    assert first.stop() == 0

    second = processes.registry(empty_dsn, tmp_path, env=unset)
    await second.wait_healthy()
    assert await _list_workspaces(second, token) == 200
    assert token not in second.log(), "printed once, when it was made"
    assert str(token_path(tmp_path / "data")) in second.log()

    environment = {**os.environ, "REGISTRY_DATA_DIR": str(tmp_path / "data"), **unset}
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry",
        "workspaces",
        "list",
        "--url",
        second.url,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, errors = await cli.communicate()
    assert cli.returncode == 0, errors.decode()


def _fake_venv(root: Path) -> tuple[Path, Path]:
    """A .venv whose python and registry only log that they ran: what scripts/serve does
    with them is what is tested, without a package index."""
    calls = root / "calls.log"
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("python", "registry"):
        script = bin_dir / program
        script.write_text(f'#!/bin/sh\necho "{program} $*" >> {calls}\n')
        script.chmod(0o755)
    return root / "venv", calls


def _serve(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve"), "--port", "1"],
        env={**os.environ, "REGISTRY_VENV": str(venv), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )


def test_scripts_serve_installs_once_then_serves_without_a_package_index(tmp_path: Path) -> None:
    venv, calls = _fake_venv(tmp_path)

    first = _serve(venv)
    installed = calls.read_text().splitlines()
    calls.write_text("")
    second = _serve(venv)

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert any(line.startswith("python -m pip install") for line in installed)
    assert installed[-1] == "registry serve --port 1"
    assert calls.read_text().splitlines() == ["registry serve --port 1"]


def test_scripts_serve_reinstalls_when_the_install_stamp_is_stale(tmp_path: Path) -> None:
    venv, calls = _fake_venv(tmp_path)
    _serve(venv)
    (venv / ".serve-installed").write_text("3.10.0 0000 embedded\n")
    calls.write_text("")

    _serve(venv)

    assert any(line.startswith("python -m pip install") for line in calls.read_text().splitlines())
