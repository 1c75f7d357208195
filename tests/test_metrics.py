"""/metrics scraped from a real app: every series issue 14 asks for, and the fleet's
plugins_sync counted by SQL agreeing with the views' own verdicts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from registry import __version__
from registry.app import create_app
from tests.conftest import MakeRegistry
from tests.pg_cluster import StoppableCluster
from tests.support import ADMIN, Registry, write_tree
from tests.test_operations import sample, scrape


def _families(text: str) -> dict[str, set[str]]:
    """Family name → the sample names it carries."""
    return {
        family.name: {s.name for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


async def test_the_standard_collectors_build_info_and_no_created_series(
    registry: Registry,
) -> None:
    text = await scrape(registry.client)
    families = _families(text)

    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections",
    ):
        assert name in families, name
    [build] = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "registry_build_info"
    ]
    assert build.value == 1
    assert build.labels["version"] == __version__
    assert build.labels["git_sha"]
    assert not [line for line in text.splitlines() if "_created" in line.split(" ")[0]]


async def test_http_requests_are_counted_by_route_name_not_raw_path(registry: Registry) -> None:
    first, second = await registry.create_workspace(), await registry.create_workspace()
    for workspace in (first, second):
        assert (await registry.client.get(f"/workspaces/{workspace.id}", headers=ADMIN)).ok
    missing = await registry.client.get(f"/workspaces/{uuid.uuid4()}", headers=ADMIN)
    nowhere = await registry.client.get("/no/such/route")

    text = await scrape(registry.client)

    assert (missing.status, nowhere.status) == (404, 404)
    assert sample(text, "registry_http_requests_total", route="get_workspace", method="GET",
                  code="200") == 2  # fmt: skip
    assert sample(text, "registry_http_requests_total", route="get_workspace", method="GET",
                  code="404") == 1  # fmt: skip
    assert sample(text, "registry_http_requests_total", route="post_workspaces", method="POST",
                  code="201") == 2  # fmt: skip
    assert sample(text, "registry_http_requests_total", route="unmatched", method="GET",
                  code="404") == 1  # fmt: skip
    assert sample(text, "registry_http_request_seconds_count", route="get_workspace",
                  method="GET") == 3  # fmt: skip
    assert first.id not in text and "/workspaces/" not in text


async def test_database_up_and_the_last_sweep(registry: Registry) -> None:
    # The sweeper sweeps as the app starts; the deadline only bounds the wait for that turn.
    deadline = time.monotonic() + 20.0
    while not sample(
        text := await scrape(registry.client), "registry_sweep_last_run_timestamp_seconds"
    ):
        assert time.monotonic() < deadline, "no sweep was recorded"
        await asyncio.sleep(0.05)

    assert sample(text, "registry_database_up") == 1
    assert sample(text, "registry_sweep_last_run_timestamp_seconds") > 1.7e9
    assert "registry_sweep_last_duration_seconds" in _families(text)
    assert sample(text, "registry_metrics_fleet_query_seconds") > 0


async def test_workspaces_by_plugins_sync_agree_with_the_views(
    registry: Registry, plugin_sources: Path
) -> None:
    good = f"file://{write_tree(plugin_sources / 'good', {'plugin.py': 'print(1)'})}"
    bad = f"file://{plugin_sources}/missing"  # allowed, but nothing there: fails for good
    # synced: online with nothing declared (two; one of them is changed below)
    plain, synced = await registry.create_workspace(), await registry.create_workspace()
    await registry.heartbeat(plain)
    await registry.heartbeat(synced)
    # out_of_sync: installed, the restart not acknowledged
    restarting = await registry.create_workspace([{"source": good}])
    await registry.heartbeat(restarting, uptime_seconds=10.0)
    # failed: its only plugin cannot be fetched
    broken = await registry.create_workspace([{"source": bad}])
    await registry.heartbeat(broken)
    # out_of_sync: never online, so never reconciled
    await registry.create_workspace([{"source": good}])
    # removed: counted by status only
    removed = await registry.create_workspace()
    assert (await registry.client.delete(f"/workspaces/{removed.id}", headers=ADMIN)).ok
    for workspace in (plain, synced, restarting, broken):
        await registry.settled(workspace)
    # out_of_sync: installed and acknowledged, but its runtime reports without the plugin
    drifted = await registry.create_workspace([{"source": good}])
    await registry.heartbeat(drifted, uptime_seconds=10.0)
    await registry.settled(drifted)
    [restart] = (await registry.heartbeat(drifted, uptime_seconds=11.0))["actions"]
    await registry.heartbeat(drifted, uptime_seconds=12.0, acks=[restart["id"]], plugins=[])
    # out_of_sync: its last run withheld the restart (the budget was used up)
    await registry.db.execute(
        "UPDATE reconciles SET restart_withheld = true WHERE workspace_id = $1",
        uuid.UUID(plain.id),
    )
    # out_of_sync: installed, no longer declared
    undeclared = await registry.create_workspace()
    await registry.db.execute(
        "INSERT INTO installed_plugins (workspace_id, name, source, sha) "
        "VALUES ($1, 'gone', $2, 'x')",
        uuid.UUID(undeclared.id),
        good,
    )
    # reconciling: a run queued, not yet due
    waiting = await registry.create_workspace()
    await registry.db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'manual', now() + interval '1 hour')",
        uuid.UUID(waiting.id),
    )

    text = await scrape(registry.client)
    listed = (await (await registry.client.get("/workspaces", headers=ADMIN)).json())["workspaces"]
    by_view = Counter(w["plugins_sync"] for w in listed)

    metric = {
        sync: sample(text, "registry_workspaces_plugins_sync", plugins_sync=sync)
        for sync in ("synced", "out_of_sync", "reconciling", "failed")
    }
    assert metric == {"synced": 1, "out_of_sync": 5, "reconciling": 1, "failed": 1}
    assert metric == {sync: by_view[sync] for sync in metric}
    assert sample(text, "registry_workspaces", status="removed") == 1
    assert sample(text, "registry_workspaces", status="paused") == 0  # zeros are series too


async def test_fleet_gauges_are_read_once_per_cache_period(make_registry: MakeRegistry) -> None:
    registry = await make_registry(metrics_cache_s=3600.0)
    before = await scrape(registry.client)
    await registry.create_workspace()

    cached = await scrape(registry.client)

    assert sample(before, "registry_workspaces", status="provisioning") == 0
    assert sample(cached, "registry_workspaces", status="provisioning") == 0
    # Process-local series are never cached.
    assert sample(cached, "registry_http_requests_total", route="post_workspaces",
                  method="POST", code="201") == 1  # fmt: skip


async def test_database_down_is_a_zero_and_the_rest_is_still_served(
    make_registry: MakeRegistry, own_cluster: StoppableCluster
) -> None:
    settings = (await make_registry()).settings
    client = TestClient(TestServer(create_app(settings, own_cluster.dsn)))
    await client.start_server()
    try:
        up = await scrape(client)
        own_cluster.stop()
        down = await scrape(client)
    finally:
        own_cluster.start()
        await client.close()

    assert sample(up, "registry_database_up") == 1
    assert sample(down, "registry_database_up") == 0
    assert sample(down, "registry_http_requests_total", route="get_metrics", method="GET",
                  code="200") == 1  # fmt: skip
