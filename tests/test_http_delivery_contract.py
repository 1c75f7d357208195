"""The runtime side of http delivery (docs/runtime-contract.md), proven against a runtime that
serves exactly that contract and records everything it is sent."""

from __future__ import annotations

from pathlib import Path

from registry.plugins.fetch import tree_digest
from tests.fake_runtime import FakeRuntime, Received
from tests.support import ADMIN, Registry, write_tree


async def test_registry_sends_only_put_and_delete_of_plugins_as_documented(
    registry: Registry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    alpha = write_tree(plugin_sources / "alpha", {"a.py": "a = 1\n"})
    beta = write_tree(plugin_sources / "beta", {"b.py": "b = 2\n"})
    workspace = await registry.create_workspace(
        [
            {"source": f"file://{alpha}", "name": "alpha"},
            {"source": f"file://{beta}", "name": "beta"},
        ],
        delivery="http",
        url=fake_runtime.url,
    )
    await registry.heartbeat(workspace)
    await registry.settled(workspace)

    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins",
        json={"plugins": [{"source": f"file://{alpha}", "name": "alpha"}]},
        headers=ADMIN,
    )
    assert response.status == 200, await response.text()
    runs = await registry.settled(workspace)

    assert all(run["status"] == "succeeded" for run in runs)
    installs = sorted(r for r in fake_runtime.received if r.method == "PUT")
    assert installs == [
        Received("PUT", "/plugins/alpha", "application/gzip", tree_digest(alpha)),
        Received("PUT", "/plugins/beta", "application/gzip", tree_digest(beta)),
    ]
    assert fake_runtime.received[2:] == [Received("DELETE", "/plugins/beta", None, None)]
    assert fake_runtime.installed() == {"alpha"}
    shown = await registry.show(workspace)
    assert [p["name"] for p in shown["installed_plugins"]] == ["alpha"]


async def test_a_runtime_answering_404_to_delete_counts_as_removed(
    registry: Registry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    alpha = write_tree(plugin_sources / "alpha", {"a.py": "a = 1\n"})
    workspace = await registry.create_workspace(
        [{"source": f"file://{alpha}", "name": "alpha"}], delivery="http", url=fake_runtime.url
    )
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    fake_runtime.fail_next, fake_runtime.fail_status = 1, 404

    response = await registry.client.put(
        f"/workspaces/{workspace.id}/plugins", json={"plugins": []}, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    runs = await registry.settled(workspace)

    assert runs[0]["status"] == "succeeded"
    assert (await registry.show(workspace))["installed_plugins"] == []
