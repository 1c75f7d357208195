"""Reconcile failure handling: retries, permanent failures, time limits, restart budget."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import MakeRegistry
from tests.fake_runtime import FakeRuntime
from tests.support import ADMIN, Registry, Workspace, make_git_repo, write_tree


@pytest.fixture
def directory_plugin(plugin_sources: Path) -> Path:
    return write_tree(plugin_sources / "seo-all", {"plugin.py": "print('seo')\n"})


async def steps_of(registry: Registry, reconcile_id: uuid.UUID) -> list[tuple[int, str, str]]:
    rows = await registry.db.fetch(
        "SELECT attempt, action, status FROM reconcile_steps WHERE reconcile_id = $1 ORDER BY id",
        reconcile_id,
    )
    return [(r["attempt"], r["action"], r["status"]) for r in rows]


async def test_delivery_failing_twice_is_retried_then_succeeds(
    registry: Registry, directory_plugin: Path, fake_runtime: FakeRuntime
) -> None:
    fake_runtime.fail_next = 2
    workspace = await registry.create_workspace(
        [{"source": f"file://{directory_plugin}"}], delivery="http", url=fake_runtime.url
    )

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert [(r["status"], r["attempt"]) for r in runs] == [("succeeded", 3)]
    assert await steps_of(registry, runs[0]["id"]) == [
        (1, "install", "failed"),
        (2, "install", "failed"),
        (3, "install", "succeeded"),
    ]
    assert len(fake_runtime.deliveries) == 1
    events = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE cause = 'reconcile_retry_scheduled'"
    )
    assert events == 2


async def test_transient_failure_gives_up_after_max_attempts(
    make_registry: MakeRegistry, directory_plugin: Path, fake_runtime: FakeRuntime
) -> None:
    registry = await make_registry(reconcile_max_attempts=2)
    fake_runtime.fail_next = 100
    workspace = await registry.create_workspace(
        [{"source": f"file://{directory_plugin}"}], delivery="http", url=fake_runtime.url
    )

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 2)]
    assert "gave up after 2 attempts" in runs[0]["error"]
    assert "delivery_failed" in runs[0]["error"]


async def declare_directly(
    registry: Registry, workspace: Workspace, name: str, source: str
) -> None:
    """A declaration that bypassed the API's checks (older data, a changed allowlist)."""
    await registry.db.execute(
        "INSERT INTO declared_plugins (workspace_id, name, source, position) "
        "VALUES ($1, $2, $3, 0)",
        uuid.UUID(workspace.id),
        name,
        source,
    )


@pytest.mark.parametrize(
    ("build", "code"),
    [
        pytest.param("denied", "source_denied", id="source-outside-allowlist"),
        pytest.param("missing-ref", "ref_not_found", id="missing-ref"),
        pytest.param("symlink", "symlink_refused", id="symlink-escape"),
        pytest.param("oversize", "tree_too_large", id="oversize-tree"),
    ],
)
async def test_permanent_failure_fails_at_once_and_installs_nothing(
    make_registry: MakeRegistry,
    plugin_sources: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    build: str,
    code: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.reconcile.runner")
    registry = await make_registry(fetch_max_bytes=10_000)
    workspace = await registry.create_workspace()
    if build == "denied":
        outside = write_tree(tmp_path / "outside" / "evil", {"x.py": "x"})
        source = f"file://{outside}"
    elif build == "missing-ref":
        make_git_repo(plugin_sources / "repo", {"a.py": "a"})
        source = f"git+file://{plugin_sources}/repo#no-such-branch"
    elif build == "symlink":
        plugin = write_tree(plugin_sources / "sly", {"a.py": "a"})
        os.symlink("/etc/passwd", plugin / "passwd")
        source = f"file://{plugin}"
    else:
        plugin = write_tree(plugin_sources / "huge", {"blob.bin": "x" * 20_000})
        source = f"file://{plugin}"
    await declare_directly(registry, workspace, "p", source)

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace)

    assert [(r["status"], r["attempt"]) for r in runs] == [("failed", 1)]
    assert code in runs[0]["error"]
    assert (await registry.show(workspace))["installed_plugins"] == []
    workspace_dir = registry.settings.resolved_plugins_dir / workspace.id
    assert not workspace_dir.exists() or list(workspace_dir.iterdir()) == []
    # Logged at warning with code, plugin and source as fields of their own.
    failed = [r for r in caplog.records if r.getMessage().startswith("reconcile step failed")]
    assert [(r.levelno, r.__dict__["code"], r.__dict__["plugin"]) for r in failed] == [
        (logging.WARNING, code, "p")
    ]
    assert failed[0].__dict__["source"] == source
    assert failed[0].__dict__["workspace_id"] == workspace.id
    ended = [r for r in caplog.records if r.getMessage().startswith("reconcile failed")]
    assert [r.levelno for r in ended] == [logging.WARNING]


async def test_reconcile_exceeding_its_time_limit_ends_failed(
    make_registry: MakeRegistry, silent_git_server: int
) -> None:
    registry = await make_registry(reconcile_timeout_s=1.0)
    workspace = await registry.create_workspace(
        [{"source": f"git+git://127.0.0.1:{silent_git_server}/slow.git#main"}]
    )

    await registry.heartbeat(workspace)
    runs = await registry.settled(workspace, within_s=15)

    assert [r["status"] for r in runs] == ["failed"]
    assert "timed out after 1 s" in runs[0]["error"]
    assert runs[0]["finished_at"] is not None


async def ack_restart(registry: Registry, workspace: Workspace) -> bool:
    actions = (await registry.heartbeat(workspace))["actions"]
    if actions:
        await registry.heartbeat(workspace, acks=[a["id"] for a in actions])
    return bool(actions)


async def put_plugins(
    registry: Registry, workspace: Workspace, source: str, name: str = "p"
) -> None:
    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": source, "name": name}]},
        headers=ADMIN,
    )
    assert response.status == 200, await response.text()


async def test_restart_budget_stops_asking_a_workspace_whose_plugins_keep_changing(
    registry: Registry, plugin_sources: Path
) -> None:
    one = write_tree(plugin_sources / "one", {"v.py": "1"})
    two = write_tree(plugin_sources / "two", {"v.py": "2"})
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    restarts = []
    for source in [one, two, one, two, one]:
        await put_plugins(registry, workspace, f"file://{source}")
        await registry.settled(workspace)
        restarts.append(await ack_restart(registry, workspace))

    assert restarts == [True, True, True, False, False]
    shown = await registry.show(workspace)
    assert shown["plugins_sync"] == "out_of_sync"
    assert "restart budget" in shown["why"]
    assert shown["last_reconcile"]["restart_withheld"] is True


async def test_converged_workspace_flipping_ten_times_is_never_asked_to_restart(
    registry: Registry, directory_plugin: Path
) -> None:
    workspace = await registry.create_workspace([{"source": f"file://{directory_plugin}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    assert await ack_restart(registry, workspace)

    asked = []
    for _ in range(10):
        await registry.set_status(workspace, "offline")
        await registry.heartbeat(workspace)
        await registry.settled(workspace)
        asked.append(await ack_restart(registry, workspace))

    assert asked == [False] * 10
    assert len(await registry.reconciles(workspace)) == 11
    assert (await registry.show(workspace))["plugins_sync"] == "synced"


async def test_removing_a_declaration_uninstalls_the_plugin(
    registry: Registry, plugin_sources: Path
) -> None:
    keep = write_tree(plugin_sources / "keep", {"k.py": "k"})
    drop = write_tree(plugin_sources / "drop", {"d.py": "d"})
    workspace = await registry.create_workspace(
        [{"source": f"file://{keep}"}, {"source": f"file://{drop}"}]
    )
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    await ack_restart(registry, workspace)

    await put_plugins(registry, workspace, f"file://{keep}", name="keep")
    runs = await registry.settled(workspace)

    installed_dir = registry.settings.resolved_plugins_dir / workspace.id
    assert sorted(p.name for p in installed_dir.iterdir()) == ["keep"]
    shown = await registry.show(workspace)
    assert [p["name"] for p in shown["installed_plugins"]] == ["keep"]
    assert runs[-1]["trigger"] == "declared_changed"
    assert await steps_of(registry, runs[-1]["id"]) == [
        (1, "skip", "skipped"),
        (1, "remove", "succeeded"),
    ]
    actions = (await registry.heartbeat(workspace))["actions"]
    assert actions[0]["reason"] == "plugins removed: drop"


async def test_put_plugins_on_an_offline_workspace_only_changes_the_declaration(
    registry: Registry, directory_plugin: Path
) -> None:
    workspace = await registry.create_workspace()
    await registry.set_status(workspace, "offline")

    await put_plugins(registry, workspace, f"file://{directory_plugin}")

    assert await registry.reconciles(workspace) == []
    shown = await registry.show(workspace)
    assert [p["name"] for p in shown["declared_plugins"]] == ["p"]
    assert shown["plugins_sync"] == "out_of_sync"
