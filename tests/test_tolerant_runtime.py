"""Tolerant runtime routes: unknown fields are ignored and reported, integral floats are
integers, `id` is an alias of `workspace_id` on register; the management API stays strict."""

from __future__ import annotations

import logging
import uuid

import pytest

from registry.keys import METRICS
from registry.tolerance import RateLimit, metric_label
from tests.support import ADMIN, Registry


def ignored_count(registry: Registry, kind: str, field: str) -> float:
    app = registry.client.app
    value = app[METRICS].registry.get_sample_value(
        "registry_runtime_ignored_fields_total", {"kind": kind, "field": field}
    )
    return value or 0.0


async def test_unknown_fields_do_not_fail_a_beat_and_are_reported(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    answer = await registry.heartbeat(
        workspace,
        is_busy=False,
        schema_version=3,
        zzz_new_thing={"a": 1},
        plugins=[{"name": "seo", "sha": "abc", "version": "1.2"}],
    )

    assert answer["status"] == "online"
    assert answer["ignored_fields"] == [
        "is_busy",
        "schema_version",
        "zzz_new_thing",
        "plugins.version",
    ]
    assert ignored_count(registry, "heartbeat", "is_busy") == 1
    assert ignored_count(registry, "heartbeat", "schema_version") == 1
    # Names outside the known list share one series: bounded cardinality.
    assert ignored_count(registry, "heartbeat", "other") == 2
    shown = await registry.show(workspace)
    assert shown["observed_plugins"] == [{"name": "seo", "sha": "abc"}]


async def test_a_beat_without_unknown_fields_reports_none(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    assert (await registry.heartbeat(workspace))["ignored_fields"] == []


async def test_prototype_pollution_key_is_just_ignored(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    answer = await registry.heartbeat(workspace, __proto__={"admin": True})
    assert answer["ignored_fields"] == ["__proto__"]


async def test_known_fields_are_still_validated(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    response = await registry.client.post(
        "/registry/heartbeat",
        json={"workspace_id": workspace.id, "is_busy": True, "error_rate": 7},
        headers=workspace.auth,
    )
    assert response.status == 400
    assert (await response.json())["error"]["field"] == "error_rate"


async def test_ignored_field_is_logged_once_per_workspace_and_field(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = await registry.create_workspace()
    with caplog.at_level(logging.INFO, logger="registry.tolerance"):
        for _ in range(3):
            await registry.heartbeat(workspace, is_busy=True)
    lines = [r for r in caplog.records if "is_busy" in r.getMessage()]
    assert len(lines) == 1
    assert workspace.id in lines[0].getMessage()


def test_rate_limit_allows_a_key_again_after_its_period() -> None:
    now = [0.0]
    limit = RateLimit(3600.0, clock=lambda: now[0])
    assert limit.allow("k")
    now[0] = 3599.0
    assert not limit.allow("k")
    assert limit.allow("other")
    now[0] = 3600.0
    assert limit.allow("k")


def test_rate_limit_memory_is_bounded() -> None:
    limit = RateLimit(3600.0, max_keys=10)
    for i in range(1000):
        assert limit.allow(i)
    assert len(limit._last) <= 10


def test_metric_label_buckets_unknown_names() -> None:
    assert metric_label("is_busy") == "is_busy"
    assert metric_label("x" * 200) == "other"


async def test_integral_float_is_an_integer_and_a_fraction_is_refused(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace, active_tasks=3.0)
    assert (await registry.show(workspace))["heartbeat"]["active_tasks"] == 3
    response = await registry.client.post(
        "/registry/heartbeat",
        json={"workspace_id": workspace.id, "active_tasks": 3.5},
        headers=workspace.auth,
    )
    assert response.status == 400
    assert (await response.json())["error"]["field"] == "active_tasks"


async def test_register_accepts_id_as_alias(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    response = await registry.client.post(
        "/registry/register",
        json={"id": workspace.id, "url": "http://127.0.0.1:1", "capabilities": ["x"]},
        headers=workspace.auth,
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["status"] == "online"
    assert body["ignored_fields"] == ["capabilities"]


async def test_register_with_id_and_workspace_id_that_differ_is_400(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    response = await registry.client.post(
        "/registry/register",
        json={"id": str(uuid.uuid4()), "workspace_id": workspace.id},
        headers=workspace.auth,
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "id"


async def test_management_api_stays_strict(registry: Registry) -> None:
    response = await registry.client.post(
        "/workspaces", json={"name": "a", "colour": "red"}, headers=ADMIN
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "unknown_field"
