"""The runtime side of http delivery (`webhooks` in registry/openapi.json), proven against a
runtime that serves exactly that contract and records everything it is sent."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import registry as registry_package
from registry.plugins.fetch import tree_digest
from tests.fake_runtime import FakeRuntime, RawRequest, Received
from tests.support import ADMIN, Registry, write_tree

SPEC = json.loads((Path(registry_package.__file__).parent / "openapi.json").read_text())
# Headers any HTTP/1.1 client sends on its own; everything else must be in the document.
HTTP_OWN = frozenset({"host", "content-length", "accept", "accept-encoding", "user-agent"})


def documented_runtime_operations() -> dict[str, dict[str, Any]]:
    """Method -> operation, from the document's `webhooks` (one operation per method)."""
    found: dict[str, dict[str, Any]] = {}
    for item in SPEC["webhooks"].values():
        for method, operation in item.items():
            assert method.upper() not in found
            found[method.upper()] = operation
    return found


def contract_violations(request: RawRequest) -> list[str]:
    """Where one request the runtime received departs from what `webhooks` documents."""
    operation = documented_runtime_operations().get(request.method)
    if operation is None:
        return [f"{request.method} is not a documented runtime operation"]
    problems = []
    name_pattern = SPEC["components"]["schemas"]["PluginName"]["pattern"]
    prefix, _, name = request.path.rpartition("/")
    if prefix != "/plugins" or not re.fullmatch(name_pattern, name):
        problems.append(f"{request.path} is not /plugins/{{name}}")
    headers = {key.lower(): value for key, value in request.headers}
    documented = {
        p["name"].lower(): p for p in operation.get("parameters", []) if p["in"] == "header"
    }
    for header, parameter in documented.items():
        if parameter.get("required") and not headers.get(header):
            problems.append(f"{request.method} without {header}")
    body = operation.get("requestBody")
    if body is not None:
        types = set(body["content"])
        documented.setdefault("content-type", {})
        if headers.get("content-type") not in types:
            problems.append(f"content type {headers.get('content-type')} is not one of {types}")
        # A gzip tarball of regular files and directories with relative, plain paths.
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(request.body))) as archive:
            for member in archive.getmembers():
                if not (member.isfile() or member.isdir()):
                    problems.append(f"tar member {member.name} is neither file nor directory")
                if member.name.startswith("/") or ".." in member.name.split("/"):
                    problems.append(f"tar member {member.name} escapes the plugin root")
    elif request.body:
        problems.append(f"{request.method} has a body, which the document does not give it")
    extra = set(headers) - HTTP_OWN - set(documented)
    if extra:
        problems.append(f"undocumented headers {sorted(extra)}")
    return problems


async def test_every_request_the_runtime_receives_is_one_the_webhooks_document(
    registry: Registry, plugin_sources: Path, fake_runtime: FakeRuntime
) -> None:
    """Install two plugins, replace one's content, remove the other: the runtime is sent
    nothing but documented operations, each with its documented headers and body."""
    alpha = write_tree(plugin_sources / "alpha", {"a.py": "a = 1\n", "sub/b.py": "b = 2\n"})
    beta = write_tree(plugin_sources / "beta", {"b.py": "b = 2\n"})
    workspace = await registry.create_workspace(
        [
            {"source": f"file://{alpha}", "name": "alpha"},
            {"source": f"file://{beta}", "name": "beta"},
        ],
        delivery="http",
        url=fake_runtime.url + "/",
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
    assert {r.method for r in fake_runtime.requests} == {"PUT", "DELETE"}
    violations = {
        f"{r.method} {r.path}": contract_violations(r)
        for r in fake_runtime.requests
        if contract_violations(r)
    }
    assert violations == {}


def test_the_contract_check_refuses_what_the_webhooks_do_not_document() -> None:
    """The check above has teeth: an undocumented method, path, header or body is caught."""
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz"):
        pass
    good_put = RawRequest(
        "PUT",
        "/plugins/alpha",
        (("Content-Type", "application/gzip"), ("X-Plugin-Sha", "abc"), ("Host", "h")),
        tarball.getvalue(),
    )
    assert contract_violations(good_put) == []
    assert contract_violations(RawRequest("DELETE", "/plugins/alpha", (), b"")) == []
    for bad in [
        RawRequest("POST", "/plugins/alpha", (), b""),
        RawRequest("DELETE", "/plugins/../x", (), b""),
        RawRequest("DELETE", "/plugins/alpha", (("Authorization", "Bearer x"),), b""),
        RawRequest("DELETE", "/plugins/alpha", (), b"x"),
        RawRequest("PUT", "/plugins/alpha", good_put.headers[:1], good_put.body),
        RawRequest(
            "PUT",
            "/plugins/alpha",
            (("Content-Type", "application/x-tar"), *good_put.headers[1:]),
            good_put.body,
        ),
    ]:
        assert contract_violations(bad), bad


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
