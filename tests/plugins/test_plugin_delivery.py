"""Delivering staged plugins into workspace plugin directories atomically."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import pytest

from registry.plugins import (
    FetchFailed,
    InvalidSource,
    StagedPlugin,
    deliver_to_filesystem,
    installed_path,
    remove_from_filesystem,
)
from registry.plugins import delivery as delivery_module

WS = str(uuid.UUID("7d0f9c1e-2b3a-4c5d-8e9f-0a1b2c3d4e5f"))


def make_staged(root: Path, label: str, files: dict[str, str]) -> StagedPlugin:
    path = root / f"staged-{label}"
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return StagedPlugin(path=path, sha=label * 40, digest=label * 64)


def contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def exists(path: Path) -> bool:
    return path.exists()


def link_workspace_dir(plugins_dir: Path, elsewhere: Path) -> None:
    elsewhere.mkdir()
    plugins_dir.mkdir()
    (plugins_dir / WS).symlink_to(elsewhere)


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    return tmp_path / "plugins"


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


async def test_deliver_into_empty_plugins_dir(plugins_dir: Path, staging: Path) -> None:
    staged = make_staged(staging, "a", {"plugin.json": "v1", "lib/x.py": "x"})
    await deliver_to_filesystem(staged, plugins_dir, WS, "tool")
    target = plugins_dir / WS / "tool"
    assert installed_path(plugins_dir, WS, "tool") == target
    assert contents(target) == {"plugin.json": "v1", "lib/x.py": "x"}
    assert os.listdir(plugins_dir / WS) == ["tool"]
    assert not staged.path.exists()


async def test_deliver_replaces_existing_install(plugins_dir: Path, staging: Path) -> None:
    await deliver_to_filesystem(
        make_staged(staging, "a", {"plugin.json": "v1", "old-only.txt": "old"}),
        plugins_dir,
        WS,
        "tool",
    )
    await deliver_to_filesystem(
        make_staged(staging, "b", {"plugin.json": "v2", "new-only.txt": "new"}),
        plugins_dir,
        WS,
        "tool",
    )
    target = plugins_dir / WS / "tool"
    assert contents(target) == {"plugin.json": "v2", "new-only.txt": "new"}
    assert os.listdir(plugins_dir / WS) == ["tool"]


async def test_deliver_replaces_existing_install_without_exchange_support(
    plugins_dir: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "_exchange", lambda a, b: False)
    await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "tool")
    await deliver_to_filesystem(make_staged(staging, "b", {"v": "2"}), plugins_dir, WS, "tool")
    assert contents(plugins_dir / WS / "tool") == {"v": "2"}
    assert os.listdir(plugins_dir / WS) == ["tool"]


async def test_deliver_failed_exchange_keeps_old_install(
    plugins_dir: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "tool")

    def broken_exchange(a: Path, b: Path) -> bool:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(delivery_module, "_exchange", broken_exchange)
    staged = make_staged(staging, "b", {"v": "2"})
    with pytest.raises(FetchFailed) as exc_info:
        await deliver_to_filesystem(staged, plugins_dir, WS, "tool")
    assert exc_info.value.code == "delivery_failed"
    assert contents(plugins_dir / WS / "tool") == {"v": "1"}
    assert os.listdir(plugins_dir / WS) == ["tool"]
    # The staged tree is handed back so a retry does not need to fetch again.
    assert contents(staged.path) == {"v": "2"}


async def test_deliver_fallback_rolls_back_when_second_rename_fails(
    plugins_dir: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "tool")
    target = plugins_dir / WS / "tool"
    real_rename = os.rename

    def failing_rename(src: Path, dst: Path) -> None:
        if Path(dst) == target and Path(src).name == "new":
            raise OSError(errno.EIO, "simulated I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(delivery_module, "_exchange", lambda a, b: False)
    monkeypatch.setattr(delivery_module, "_rename", failing_rename)
    with pytest.raises(FetchFailed):
        await deliver_to_filesystem(make_staged(staging, "b", {"v": "2"}), plugins_dir, WS, "tool")
    assert contents(target) == {"v": "1"}
    assert os.listdir(plugins_dir / WS) == ["tool"]


async def test_remove_is_idempotent(plugins_dir: Path, staging: Path) -> None:
    await remove_from_filesystem(plugins_dir, WS, "tool")
    await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "tool")
    await remove_from_filesystem(plugins_dir, WS, "tool")
    assert not (plugins_dir / WS / "tool").exists()
    assert os.listdir(plugins_dir / WS) == []
    await remove_from_filesystem(plugins_dir, WS, "tool")


async def test_remove_leaves_other_plugins(plugins_dir: Path, staging: Path) -> None:
    await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "one")
    await deliver_to_filesystem(make_staged(staging, "b", {"v": "2"}), plugins_dir, WS, "two")
    await remove_from_filesystem(plugins_dir, WS, "one")
    assert os.listdir(plugins_dir / WS) == ["two"]


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "", ".staging-x"])
async def test_deliver_refuses_unsafe_plugin_names(
    plugins_dir: Path, staging: Path, name: str
) -> None:
    staged = make_staged(staging, "a", {"v": "1"})
    with pytest.raises(InvalidSource) as exc_info:
        await deliver_to_filesystem(staged, plugins_dir, WS, name)
    assert exc_info.value.code == "invalid_plugin_name"
    assert not exists(plugins_dir)
    with pytest.raises(InvalidSource):
        await remove_from_filesystem(plugins_dir, WS, name)


@pytest.mark.parametrize("workspace_id", ["../etc", "not-a-uuid", "", "/abs"])
async def test_deliver_refuses_invalid_workspace_ids(
    plugins_dir: Path, staging: Path, workspace_id: str
) -> None:
    staged = make_staged(staging, "a", {"v": "1"})
    with pytest.raises(InvalidSource) as exc_info:
        await deliver_to_filesystem(staged, plugins_dir, workspace_id, "tool")
    assert exc_info.value.code == "invalid_workspace_id"
    assert not exists(plugins_dir)


def test_installed_path_normalises_workspace_id(plugins_dir: Path) -> None:
    assert installed_path(plugins_dir, WS.upper(), "tool") == plugins_dir / WS / "tool"


async def test_deliver_refuses_symlinked_workspace_dir(
    plugins_dir: Path, staging: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    link_workspace_dir(plugins_dir, elsewhere)
    with pytest.raises(FetchFailed) as exc_info:
        await deliver_to_filesystem(make_staged(staging, "a", {"v": "1"}), plugins_dir, WS, "tool")
    assert exc_info.value.code == "path_escape"
    assert os.listdir(elsewhere) == []


def _other_filesystem(path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return shm
    return None


async def test_deliver_from_another_filesystem_copies(plugins_dir: Path, staging: Path) -> None:
    other = _other_filesystem(staging)
    if other is None:
        pytest.skip("no second writable filesystem available")
    root = other / f"plugin-test-{uuid.uuid4().hex}"
    try:
        staged = make_staged(root, "a", {"plugin.json": "v1"})
        await deliver_to_filesystem(staged, plugins_dir, WS, "tool")
        assert contents(plugins_dir / WS / "tool") == {"plugin.json": "v1"}
        assert os.listdir(plugins_dir / WS) == ["tool"]
        assert not exists(staged.path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
