"""The CLI's names, labels and list filters, through the real HTTP API of a registry process."""

from __future__ import annotations

import uuid

import asyncpg

from tests.test_cli import cli, create, ok, registry_process, url

__all__ = ["registry_process", "url"]  # fixtures, used by name


async def test_create_with_labels_and_change_them_by_name(url: str) -> None:
    workspace_id, _ = await create(url, "web-1", "--label", "env=prod", "--label", "tier=web")
    shown = (await ok(url, "workspaces", "show", "web-1", "--json")).json()
    assert (shown["id"], shown["labels"]) == (workspace_id, {"env": "prod", "tier": "web"})
    assert "labels          env=prod,tier=web" in (await ok(url, "workspaces", "show", "web-1")).out

    changed = await ok(url, "workspaces", "labels", "web-1", "team=a", "tier-")
    assert changed.out.strip() == "env=prod,team=a"
    replaced = await ok(url, "workspaces", "labels", workspace_id, "only=this", "--replace")
    assert replaced.out.strip() == "only=this"
    assert (await ok(url, "workspaces", "labels", "web-1")).out.strip() == "only=this"

    bad = await cli(url, "workspaces", "labels", "web-1", "Bad_=x")
    assert bad.code == 1
    assert bad.err.startswith("registry: 400 invalid_field: invalid label key")


async def test_every_workspace_command_takes_a_name(url: str, db: asyncpg.Connection) -> None:
    workspace_id, _ = await create(url, "named")
    paused = await ok(url, "workspaces", "pause", "named")
    assert f"workspace {workspace_id} is paused" in paused.out
    assert "is offline" in (await ok(url, "workspaces", "resume", "named")).out
    events = (await ok(url, "events", "--workspace", "named", "--json")).json()["events"]
    assert {e["workspace_id"] for e in events} == {workspace_id}
    refused = await cli(url, "reconcile", "named", "--no-wait")
    assert refused.err.startswith("registry: 409 workspace_not_live")  # resolved, then refused
    assert "is removed" in (await ok(url, "workspaces", "delete", "named")).out

    missing = await cli(url, "workspaces", "show", "nobody")
    assert missing.code == 3  # not found
    assert missing.err == "registry: 404 workspace_not_found: no workspace named 'nobody'\n"


async def test_creating_a_taken_name_is_a_conflict_naming_the_existing_one(url: str) -> None:
    workspace_id, _ = await create(url, "taken")
    again = await cli(url, "workspaces", "create", "taken")
    assert again.code == 4  # conflict
    assert again.err.startswith("registry: 409 already_exists: ")
    assert workspace_id in again.err


async def test_list_filters_reach_the_api(url: str, db: asyncpg.Connection) -> None:
    prod, _ = await create(url, "web-a", "--label", "env=prod")
    canary, _ = await create(url, "web-b", "--label", "env=prod", "--label", "tier=canary")
    other, _ = await create(url, "db-a", "--label", "env=dev")
    await db.execute("UPDATE workspaces SET status = 'paused' WHERE id = $1", uuid.UUID(other))

    async def listed(*args: str) -> set[str]:
        page = (await ok(url, "workspaces", "list", "--json", "--all", *args)).json()
        return {w["id"] for w in page["workspaces"]}

    assert await listed("-l", "env=prod,tier!=canary") == {prod}
    assert await listed("--selector", "env in (prod,dev)", "--name-prefix", "web") == {
        prod,
        canary,
    }
    assert await listed("--status", "paused,provisioning", "--status", "online") == {
        prod,
        canary,
        other,
    }
    assert await listed("--status", "paused") == {other}
    assert await listed("--sync", "synced", "--name-prefix", "db") == {other}
    assert await listed("--has", "refusal") == set()
    assert (await ok(url, "workspaces", "delete", "db-a")).code == 0
    assert await listed("--include-removed", "--name-prefix", "db") == {other}
    assert await listed("--name-prefix", "db") == set()

    bad = await cli(url, "workspaces", "list", "-l", "env=prod,")
    assert (bad.code, bad.err.split(":")[1]) == (1, " 400 invalid_field")
    usage = await cli(url, "workspaces", "list", "--status", "asleep")
    assert usage.code == 2
