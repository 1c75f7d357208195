"""End to end: a plugin update fanned out to many workspaces costs one resolution, one fetch."""

from __future__ import annotations

import re

from bench.git_daemon import CountingGitDaemon
from tests.conftest import MakeRegistry
from tests.plugins.conftest import Repo
from tests.support import ADMIN, Registry, Workspace, read_tree

N = 30


async def declarers(registry: Registry, source: str, n: int) -> list[Workspace]:
    """n workspaces declaring `source`, online, with it installed."""
    workspaces = [await registry.create_workspace([{"source": source}]) for _ in range(n)]
    for workspace in workspaces:
        await registry.heartbeat(workspace)
    for workspace in workspaces:
        await registry.settled(workspace)
    return workspaces


async def fan_out(registry: Registry, source: str, workspaces: list[Workspace]) -> None:
    response = await registry.client.post(
        "/internal/plugins/reconcile", json={"source": source}, headers=ADMIN
    )
    assert (response.status, await response.json()) == (202, {"queued": len(workspaces)})
    for workspace in workspaces:
        runs = await registry.settled(workspace)
        assert (runs[-1]["trigger"], runs[-1]["status"]) == ("plugin_updated", "succeeded")


def served_repo(git_daemon: CountingGitDaemon) -> Repo:
    repo = Repo(git_daemon.base / "tool")
    repo.write("main.py", "print('v1')\n")
    repo.commit("v1")
    return repo


async def test_a_fan_out_to_30_workspaces_resolves_once_and_fetches_once(
    make_registry: MakeRegistry, git_daemon: CountingGitDaemon
) -> None:
    repo = served_repo(git_daemon)
    source = f"git+{git_daemon.url('tool')}#main"
    registry = await make_registry(plugin_allowlist=(git_daemon.allow_prefix,))
    workspaces = await declarers(registry, source, N)
    repo.write("main.py", "print('v2')\n")
    moved = repo.commit("v2")
    before = git_daemon.connections()

    await fan_out(registry, source, workspaces)

    # One ls-remote for the refresh of all 30, one fetch of the new commit's tree.
    assert git_daemon.connections() - before == 2
    for workspace in workspaces:
        installed = registry.settings.resolved_plugins_dir / workspace.id / "tool"
        assert read_tree(installed) == {"main.py": "print('v2')\n"}
        assert (await registry.show(workspace))["installed_plugins"][0]["sha"] == moved
    cached = [
        p
        for p in registry.settings.resolved_tree_cache_dir.iterdir()
        if re.fullmatch("[0-9a-f]{64}", p.name)
    ]
    assert len(cached) == 2  # v1 (the first installs) and v2


async def test_without_the_tree_cache_each_workspace_fetches_but_the_resolution_is_shared(
    make_registry: MakeRegistry, git_daemon: CountingGitDaemon
) -> None:
    repo = served_repo(git_daemon)
    source = f"git+{git_daemon.url('tool')}#main"
    registry = await make_registry(
        plugin_allowlist=(git_daemon.allow_prefix,), tree_cache_max_bytes=0
    )
    workspaces = await declarers(registry, source, N)
    repo.write("main.py", "print('v2')\n")
    repo.commit("v2")
    before = git_daemon.connections()

    await fan_out(registry, source, workspaces)

    assert git_daemon.connections() - before == 1 + N
    assert not registry.settings.resolved_tree_cache_dir.exists()


async def test_unshared_each_workspace_resolves_twice_and_fetches(
    make_registry: MakeRegistry, git_daemon: CountingGitDaemon
) -> None:
    # The behaviour before sharing (issue 13), kept behind fetch_shared=false to measure it:
    # per workspace a refresh ls-remote, then the install's own ls-remote and fetch.
    repo = served_repo(git_daemon)
    source = f"git+{git_daemon.url('tool')}#main"
    registry = await make_registry(plugin_allowlist=(git_daemon.allow_prefix,), fetch_shared=False)
    workspaces = await declarers(registry, source, N)
    repo.write("main.py", "print('v2')\n")
    repo.commit("v2")
    before = git_daemon.connections()

    await fan_out(registry, source, workspaces)

    assert git_daemon.connections() - before == 3 * N


async def test_a_second_plugin_update_is_resolved_and_fetched_again(
    make_registry: MakeRegistry, git_daemon: CountingGitDaemon
) -> None:
    repo = served_repo(git_daemon)
    source = f"git+{git_daemon.url('tool')}#main"
    registry = await make_registry(plugin_allowlist=(git_daemon.allow_prefix,))
    workspaces = await declarers(registry, source, 3)
    repo.write("main.py", "print('v2')\n")
    repo.commit("v2")
    await fan_out(registry, source, workspaces)
    repo.write("main.py", "print('v3')\n")
    moved = repo.commit("v3")
    before = git_daemon.connections()

    # Asked after the last resolution: it must not be answered by it.
    await fan_out(registry, source, workspaces)

    assert git_daemon.connections() - before == 2
    for workspace in workspaces:
        assert (await registry.show(workspace))["installed_plugins"][0]["sha"] == moved
