"""A restart action already handed out to the runtime never absorbs a later install."""

from __future__ import annotations

from pathlib import Path

from tests.support import ADMIN, Registry, write_tree


async def test_install_after_a_handed_out_restart_asks_a_new_restart(
    registry: Registry, plugin_sources: Path
) -> None:
    first = write_tree(plugin_sources / "first", {"plugin.py": "print(1)\n"})
    second = write_tree(plugin_sources / "second", {"plugin.py": "print(2)\n"})
    workspace = await registry.create_workspace([{"source": f"file://{first}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    # The runtime is handed the restart for the first plugin (and may carry it out now).
    handed_out = (await registry.heartbeat(workspace))["actions"]
    assert [a["type"] for a in handed_out] == ["restart"]

    # A second plugin is added and installed while that restart is not yet acknowledged.
    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": f"file://{first}"}, {"source": f"file://{second}"}]},
        headers=ADMIN,
    )
    assert response.status < 300, await response.text()
    await registry.settled(workspace)

    # The runtime acks the old action: the second plugin's restart must still be asked.
    after_ack = await registry.heartbeat(workspace, acks=[handed_out[0]["id"]])
    assert len(after_ack["actions"]) == 1
    assert after_ack["actions"][0]["id"] != handed_out[0]["id"]
    assert "second" in after_ack["actions"][0]["reason"]


async def test_restart_not_yet_handed_out_still_covers_a_later_install(
    registry: Registry, plugin_sources: Path
) -> None:
    first = write_tree(plugin_sources / "first", {"plugin.py": "print(1)\n"})
    second = write_tree(plugin_sources / "second", {"plugin.py": "print(2)\n"})
    workspace = await registry.create_workspace([{"source": f"file://{first}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    # No heartbeat has carried the restart yet: the next install folds into it.
    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": f"file://{first}"}, {"source": f"file://{second}"}]},
        headers=ADMIN,
    )
    assert response.status < 300, await response.text()
    await registry.settled(workspace)
    actions = (await registry.heartbeat(workspace))["actions"]
    assert len(actions) == 1
