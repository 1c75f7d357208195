"""Operational endpoints: health, readiness through a database outage, build info, metrics,
request ids and structured logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.logs import JsonFormatter, request_id_var
from tests.conftest import MakeRegistry
from tests.pg_cluster import StoppableCluster
from tests.support import ADMIN, AppClient, Registry


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return 0.0


async def scrape(client: AppClient) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def test_health_and_build_info_need_no_token(registry: Registry) -> None:
    health = await registry.client.get("/healthz")
    ready = await registry.client.get("/readyz")
    build = await registry.client.get("/buildinfo")

    assert (health.status, ready.status, build.status) == (200, 200, 200)
    info = await build.json()
    assert info["version"]
    assert info["git_sha"] is None or len(info["git_sha"]) == 40


async def test_metrics_move_with_heartbeats_transitions_and_reconciles(
    registry: Registry,
) -> None:
    before = await scrape(registry.client)
    workspace = await registry.create_workspace()

    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=ADMIN
    )
    after = await scrape(registry.client)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("registry_heartbeats_total", kind="heartbeat", outcome="ok", code="200") == 1
    assert (
        moved("registry_heartbeats_total", kind="heartbeat", outcome="unauthorized", code="401")
        == 1
    )
    assert moved("registry_heartbeat_seconds_count", kind="heartbeat") == 2
    assert (
        moved(
            "registry_status_transitions_total",
            from_status="provisioning",
            to_status="online",
            cause="heartbeat",
        )
        == 1
    )
    assert (
        moved("registry_reconcile_runs_total", trigger="online_transition", outcome="succeeded")
        == 1
    )
    assert moved("registry_reconcile_seconds_count") == 1
    assert sample(after, "registry_workspaces", status="online") == 1
    assert sample(after, "registry_reconcile_backlog", status="queued") == 0
    assert sample(after, "registry_mass_expiry_guard_holding") == 0
    assert "registry_db_pool_connections" in after
    assert "registry_event_subscribers" in after


async def test_readyz_is_503_while_the_database_is_down_and_recovers_by_itself(
    make_registry: MakeRegistry, own_cluster: StoppableCluster
) -> None:
    from aiohttp.test_utils import TestClient as Client
    from aiohttp.test_utils import TestServer

    from registry.app import create_app

    settings = (await make_registry()).settings
    client = Client(TestServer(create_app(settings, own_cluster.dsn)))
    await client.start_server()
    try:
        up = await client.get("/readyz")
        own_cluster.stop()
        started = time.monotonic()
        down = await client.get("/readyz")
        answered_in = time.monotonic() - started
        down_body = await down.json()
        health = await client.get("/healthz")
        own_cluster.start()
        recovered = None
        for _ in range(100):
            recovered = await client.get("/readyz")
            if recovered.status == 200:
                break
            await asyncio.sleep(0.1)
    finally:
        await client.close()

    assert up.status == 200
    assert down.status == 503
    assert down.headers["Retry-After"]
    assert down_body["error"]["code"] == "database_unavailable"
    assert answered_in < 5
    assert health.status == 200  # the process itself is fine
    assert recovered is not None and recovered.status == 200


async def test_request_id_is_accepted_or_generated_and_returned(registry: Registry) -> None:
    given = await registry.client.get("/healthz", headers={"X-Request-Id": "req-42"})
    generated = await registry.client.get("/healthz")
    another = await registry.client.get("/healthz")
    unsafe = await registry.client.get("/healthz", headers={"X-Request-Id": "a b\tc"})
    error = await registry.client.get("/workspaces/nope", headers={**ADMIN, "X-Request-Id": "e1"})

    assert given.headers["X-Request-Id"] == "req-42"
    assert generated.headers["X-Request-Id"] != another.headers["X-Request-Id"]
    assert len(generated.headers["X-Request-Id"]) == 24
    assert unsafe.headers["X-Request-Id"] != "a b\tc"
    assert error.headers["X-Request-Id"] == "e1"


def test_json_logs_are_one_object_per_line_with_context() -> None:
    record = logging.LogRecord("registry.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.workspace_id = "w-1"
    token = request_id_var.set("r-1")
    try:
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)

    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "hello you"
    assert entry["level"] == "info"
    assert entry["workspace_id"] == "w-1"
    assert entry["request_id"] == "r-1"


async def test_a_request_never_logs_the_token(
    registry: Registry, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    workspace = await registry.create_workspace()
    caplog.set_level(logging.DEBUG)

    await registry.heartbeat(workspace)
    await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=ADMIN
    )
    await registry.settled(workspace)

    assert workspace.token not in caplog.text
    assert ADMIN["Authorization"].split()[1] not in caplog.text
