"""End to end: a heartbeat flips a workspace online and its declared plugins get installed."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from registry.plugins import tree_digest
from tests.fake_runtime import FakeRuntime
from tests.support import Registry, git, make_git_repo, read_tree, write_tree


@pytest.fixture
def directory_plugin(plugin_sources: Path) -> Path:
    return write_tree(
        plugin_sources / "seo-all",
        {"plugin.py": "print('seo')\n", "data/keywords.txt": "agents\n"},
    )


@pytest.fixture
def git_plugin(plugin_sources: Path) -> tuple[Path, str]:
    repo = plugin_sources / "summarise"
    sha = make_git_repo(repo, {"main.py": "print('v1')\n"}, branch="stable")
    return repo, sha


async def test_first_heartbeat_installs_directory_and_git_plugins(
    registry: Registry, directory_plugin: Path, git_plugin: tuple[Path, str]
) -> None:
    repo, sha = git_plugin
    workspace = await registry.create_workspace(
        [
            {"source": f"file://{directory_plugin}"},
            {"source": f"git+file://{repo}#stable"},
        ]
    )

    beat = await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert (beat["previous_status"], beat["status"]) == ("provisioning", "online")
    assert [(r["trigger"], r["status"]) for r in runs] == [("online_transition", "succeeded")]
    installed_dir = registry.settings.resolved_plugins_dir / workspace.id
    assert read_tree(installed_dir / "seo-all") == {
        "plugin.py": "print('seo')\n",
        "data/keywords.txt": "agents\n",
    }
    assert read_tree(installed_dir / "summarise") == {"main.py": "print('v1')\n"}
    shown = await registry.show(workspace)
    assert {p["name"]: p["sha"] for p in shown["installed_plugins"]} == {
        "seo-all": tree_digest(directory_plugin),
        "summarise": sha,
    }
    # Installed, not yet loaded: the runtime has a restart to do.
    assert shown["plugins_sync"] == "out_of_sync"
    [restart] = shown["pending_actions"]
    await registry.heartbeat(workspace, acks=[restart["id"]])
    assert (await registry.show(workspace))["plugins_sync"] == "synced"
    last = shown["last_reconcile"]
    assert last["status"] == "succeeded"
    assert last["restart_requested"] is True
    assert {(s["plugin"], s["action"], s["status"]) for s in last["steps"]} == {
        ("seo-all", "install", "succeeded"),
        ("summarise", "install", "succeeded"),
    }


async def test_git_plugin_is_fetched_at_the_commit_the_ref_resolved_to(
    registry: Registry, git_plugin: tuple[Path, str]
) -> None:
    repo, sha = git_plugin
    workspace = await registry.create_workspace([{"source": f"git+file://{repo}#{sha}"}])
    (repo / "main.py").write_text("print('v2')\n")
    git(repo, "commit", "-qam", "v2")

    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    installed = registry.settings.resolved_plugins_dir / workspace.id / "summarise"
    assert read_tree(installed) == {"main.py": "print('v1')\n"}
    assert (await registry.show(workspace))["installed_plugins"][0]["sha"] == sha


async def test_restart_action_repeats_until_acknowledged(
    registry: Registry, directory_plugin: Path
) -> None:
    workspace = await registry.create_workspace([{"source": f"file://{directory_plugin}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    first = await registry.heartbeat(workspace)
    second = await registry.heartbeat(workspace)
    action_id = first["actions"][0]["id"]
    acking = await registry.heartbeat(workspace, acks=[action_id])
    after = await registry.heartbeat(workspace)

    assert first["actions"] == second["actions"]
    assert first["actions"][0]["type"] == "restart"
    assert "seo-all" in first["actions"][0]["reason"]
    assert acking["actions"] == []
    assert after["actions"] == []


async def test_converged_workspace_coming_back_online_reconciles_to_a_no_op(
    registry: Registry, directory_plugin: Path, git_plugin: tuple[Path, str]
) -> None:
    repo, _ = git_plugin
    workspace = await registry.create_workspace(
        [{"source": f"file://{directory_plugin}"}, {"source": f"git+file://{repo}#stable"}]
    )
    first = await registry.heartbeat(workspace)
    await registry.settled(workspace)
    restart = (await registry.heartbeat(workspace))["actions"][0]["id"]
    await registry.heartbeat(workspace, acks=[restart])
    plugin_dir = registry.settings.resolved_plugins_dir / workspace.id / "seo-all"
    inode_before = plugin_dir.stat().st_ino
    # Runtime-generated files must not make a converged plugin look changed.
    write_tree(plugin_dir, {"__pycache__/plugin.cpython-311.pyc": "bytecode"})

    await registry.set_status(workspace, "offline")
    back = await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)
    later = await registry.heartbeat(workspace)

    assert first["previous_status"] == "provisioning"
    assert (back["previous_status"], back["status"]) == ("offline", "online")
    assert len(runs) == 2
    assert runs[1]["status"] == "succeeded"
    assert runs[1]["restart_requested"] is False
    steps = await registry.db.fetch(
        "SELECT action, status FROM reconcile_steps WHERE reconcile_id = $1", runs[1]["id"]
    )
    assert {(s["action"], s["status"]) for s in steps} == {("skip", "skipped")}
    assert later["actions"] == []
    assert plugin_dir.stat().st_ino == inode_before


async def test_plugin_the_runtime_does_not_report_is_installed_again(
    registry: Registry, directory_plugin: Path
) -> None:
    workspace = await registry.create_workspace([{"source": f"file://{directory_plugin}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    # The box was replaced: it comes back reporting no plugins at all.
    await registry.set_status(workspace, "offline")
    await registry.heartbeat(workspace, plugins=[])
    runs = await registry.settled(workspace)

    steps = await registry.db.fetch(
        "SELECT action, status FROM reconcile_steps WHERE reconcile_id = $1", runs[-1]["id"]
    )
    assert [(s["action"], s["status"]) for s in steps] == [("install", "succeeded")]
    assert runs[-1]["restart_requested"] is True


async def test_heartbeat_is_answered_without_waiting_for_a_slow_plugin_source(
    registry: Registry, silent_git_server: int
) -> None:
    workspace = await registry.create_workspace(
        [{"source": f"git+git://127.0.0.1:{silent_git_server}/slow.git#main"}]
    )

    started = time.monotonic()
    beat = await registry.heartbeat(workspace)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    runs = await registry.reconciles(workspace)

    assert beat["status"] == "online"
    assert elapsed < 1.0
    assert [r["status"] for r in runs] == ["running"]


async def test_failed_install_is_recorded_with_its_reason_and_records_nothing(
    registry: Registry, git_plugin: tuple[Path, str]
) -> None:
    repo, _ = git_plugin
    workspace = await registry.create_workspace([{"source": f"git+file://{repo}#no-such-ref"}])

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert runs[0]["status"] == "failed"
    assert "ref_not_found" in runs[0]["error"]
    assert runs[0]["finished_at"] is not None
    shown = await registry.show(workspace)
    assert shown["installed_plugins"] == []
    assert shown["plugins_sync"] == "failed"
    assert "ref_not_found" in shown["why"]
    assert not (registry.settings.resolved_plugins_dir / workspace.id / "summarise").exists()


async def test_sha_is_recorded_only_after_delivery_succeeded(
    registry: Registry, directory_plugin: Path
) -> None:
    workspace = await registry.create_workspace([{"source": f"file://{directory_plugin}"}])
    # Delivery fails: the workspace's plugins directory cannot be created (a file is there).
    plugins_dir = registry.settings.resolved_plugins_dir
    plugins_dir.mkdir(parents=True)
    (plugins_dir / workspace.id).write_text("in the way")

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert runs[0]["status"] == "failed"
    count = await registry.db.fetchval(
        "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1", uuid.UUID(workspace.id)
    )
    assert count == 0
    assert (await registry.heartbeat(workspace))["actions"] == []


async def test_http_delivery_puts_a_tarball_with_the_sha_to_the_runtime(
    registry: Registry, directory_plugin: Path, fake_runtime: FakeRuntime
) -> None:
    workspace = await registry.create_workspace(
        [{"source": f"file://{directory_plugin}"}], delivery="http"
    )

    response = await registry.client.post(
        "/registry/register",
        json={"workspace_id": workspace.id, "url": fake_runtime.url},
        headers=workspace.auth,
    )
    runs = await registry.settled(workspace)

    assert response.status == 200
    assert runs[0]["status"] == "succeeded"
    assert [(d.name, d.sha, d.files) for d in fake_runtime.deliveries] == [
        (
            "seo-all",
            tree_digest(directory_plugin),
            {"plugin.py": "print('seo')\n", "data/keywords.txt": "agents\n"},
        )
    ]
    shown = await registry.show(workspace)
    assert shown["installed_plugins"][0]["sha"] == tree_digest(directory_plugin)
    assert not (registry.settings.resolved_plugins_dir / workspace.id).exists()


async def test_http_delivery_refused_by_the_runtime_records_nothing(
    registry: Registry, directory_plugin: Path, fake_runtime: FakeRuntime
) -> None:
    fake_runtime.fail_next, fake_runtime.fail_status = 1, 400
    workspace = await registry.create_workspace(
        [{"source": f"file://{directory_plugin}"}], delivery="http", url=fake_runtime.url
    )

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert runs[0]["status"] == "failed"
    assert "delivery_rejected" in runs[0]["error"]
    assert (await registry.show(workspace))["installed_plugins"] == []
