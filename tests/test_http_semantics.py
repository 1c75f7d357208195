"""HTTP semantics that generic clients rely on: Allow on 405, HEAD on the probes."""

from __future__ import annotations

import pytest

from tests.support import Registry


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("TRACE", "/healthz", {"GET", "HEAD"}),
        ("POST", "/metrics", {"GET", "HEAD"}),
        ("GET", "/registry/heartbeat", {"POST"}),
        ("PATCH", "/workspaces", {"GET", "POST"}),
    ],
)
async def test_405_names_the_allowed_methods_in_the_envelope(
    registry: Registry, method: str, path: str, allowed: set[str]
) -> None:
    response = await registry.client.request(method, path)

    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == allowed
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_answer_head_like_get_without_a_body(registry: Registry, path: str) -> None:
    get = await registry.client.get(path)
    head = await registry.client.head(path)

    assert head.status == get.status == 200
    assert head.content_type == get.content_type
    assert await head.read() == b""
