"""A restart action already handed out to the runtime never absorbs a later install."""

from __future__ import annotations

from pathlib import Path

from tests.support import ADMIN, Registry, Workspace, write_tree


def _source(plugin_sources: Path, name: str) -> str:
    return f"file://{write_tree(plugin_sources / name, {'plugin.py': f'print({name!r})'})}"


async def _online_with_first_installed(registry: Registry, plugin_sources: Path) -> Workspace:
    workspace = await registry.create_workspace([{"source": _source(plugin_sources, "first")}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    return workspace


async def _add_second_plugin(
    registry: Registry, workspace: Workspace, plugin_sources: Path
) -> None:
    plugins = [{"source": _source(plugin_sources, n)} for n in ("first", "second")]
    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins", json={"plugins": plugins}, headers=ADMIN
    )
    assert response.status < 300, await response.text()
    await registry.settled(workspace)


async def test_install_after_a_handed_out_restart_asks_a_new_restart(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_first_installed(registry, plugin_sources)

    # The runtime is handed the restart for the first plugin (and may carry it out now).
    handed_out = (await registry.heartbeat(workspace))["actions"]
    assert [a["type"] for a in handed_out] == ["restart"]

    # A second plugin is added and installed while that restart is not yet acknowledged.
    await _add_second_plugin(registry, workspace, plugin_sources)

    # The runtime acks the old action: the second plugin's restart must still be asked.
    after_ack = await registry.heartbeat(workspace, acks=[handed_out[0]["id"]])
    assert len(after_ack["actions"]) == 1
    assert after_ack["actions"][0]["id"] != handed_out[0]["id"]
    assert "second" in after_ack["actions"][0]["reason"]


async def test_restart_not_yet_handed_out_still_covers_a_later_install(
    registry: Registry, plugin_sources: Path
) -> None:
    workspace = await _online_with_first_installed(registry, plugin_sources)
    # No heartbeat has carried the restart yet: the next install folds into it.
    await _add_second_plugin(registry, workspace, plugin_sources)
    actions = (await registry.heartbeat(workspace))["actions"]
    assert len(actions) == 1
