"""The CLI as a fleet operator uses it: a command for every API operation, exit codes that
scripts can branch on, `wait`, list outputs, fleet-wide history, completion, and URLs
without a scheme — all through `python -m registry` against a real registry process."""

from __future__ import annotations

import asyncio
import json
import shlex
import uuid
from pathlib import Path

import pytest

from registry.cli import EXAMPLES, _parser, _with_reconcile_run, main
from tests.processes import RegistryProcess, free_port
from tests.support import write_tree
from tests.test_cli import cli, create, heartbeat, ok, registry_env, registry_process, url

__all__ = ["registry_env", "registry_process", "url"]  # fixtures, used by name

SPEC = Path(__file__).parents[1] / "registry" / "openapi.json"

# Every operation of the API and the command that does it; a new route without a command
# fails the first test below. The runtime's routes and the probes are not the CLI's.
CLI_COMMANDS = {
    "post_workspaces": "workspaces create",
    "get_workspaces": "workspaces list",
    "get_workspace": "workspaces show",
    "get_workspace_by_name": "workspaces show",  # a name where the id goes
    "patch_workspace_labels": "workspaces labels",
    "put_workspace_labels": "workspaces labels",  # --replace
    "delete_workspace": "workspaces delete",
    "post_pause": "workspaces pause",
    "post_resume": "workspaces resume",
    "post_token": "workspaces rotate",
    "put_workspace_plugins": "workspaces plugins set",
    "get_workspace_events": "workspaces events",
    "get_event_history": "events",
    "get_events": "events",  # --follow
    "get_fleet": "fleet",
    "get_fleet_history": "fleet history",
    "post_guard_ack": "fleet guard ack",
    "post_tokens": "tokens create",
    "get_tokens": "tokens list",
    "delete_token": "tokens revoke",
    "post_workspace_reconcile": "reconcile run",
    "get_workspace_reconciles": "reconcile history",
    "get_reconcile": "reconcile show",
    "post_plugins_reconcile": "reconcile fanout",
}
RUNTIME_AND_PROBE_OPERATIONS = {
    "post_heartbeat",
    "post_register",
    "get_healthz",
    "get_readyz",
    "get_buildinfo",
    "get_openapi",
    "get_metrics",
    # The dashboard's pages and browser sessions (issue 17): the CLI has its token already.
    "get_root",
    "get_ui",
    "get_ui_asset",
    "post_ui_login",
    "post_ui_logout",
    "get_ui_session",
}


def test_every_api_operation_has_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    operations = {
        operation["operationId"]
        for methods in json.loads(SPEC.read_text())["paths"].values()
        for operation in methods.values()
    }
    assert operations - RUNTIME_AND_PROBE_OPERATIONS == set(CLI_COMMANDS)
    for operation, command in CLI_COMMANDS.items():
        with pytest.raises(SystemExit) as exited:
            main([*command.split(), "--help"])
        assert exited.value.code == 0, operation
        assert "usage: registry " + command in capsys.readouterr().out, operation


async def test_exit_codes_tell_scripts_what_happened(url: str) -> None:
    workspace_id, _ = await create(url, "provisioning-still")
    missing = str(uuid.uuid4())

    assert (await cli(url, "workspaces", "show", missing)).code == 3
    assert (await cli(url, "reconcile", "history", missing)).code == 3
    assert (await cli(url, "workspaces", "events", missing)).code == 3
    assert (await cli(url, "events", "--workspace", missing)).code == 3
    assert (await cli(url, "reconcile", "run", workspace_id)).code == 4
    assert (await cli(url, "workspaces", "list", token="not-a-token-of-this-registry")).code == 1
    assert (await cli(f"127.0.0.1:{free_port()}", "fleet")).code == 5
    assert (await cli(url, "workspaces", "list", "--limit", "0")).code == 2


async def test_errors_stay_json_under_json(url: str) -> None:
    missing = str(uuid.uuid4())

    result = await cli(url, "--json", "workspaces", "show", missing)

    assert result.code == 3
    assert result.json() == {
        "error": {
            "code": "workspace_not_found",
            "message": f"no workspace {missing}",
            "status": 404,
        }
    }
    unreachable = await cli(f"http://127.0.0.1:{free_port()}", "fleet", "--json")
    assert unreachable.code == 5
    assert unreachable.json()["error"]["code"] == "unreachable"


async def test_a_registry_url_without_a_scheme_works(registry_process: RegistryProcess) -> None:
    bare = registry_process.url.removeprefix("http://")

    result = await ok(bare, "fleet", "--json")

    assert "statuses" in result.json()
    flagged = await cli(None, "--url", bare, "workspaces", "list", "-o", "name")
    assert flagged.code == 0, flagged


async def test_url_is_the_registry_and_workspace_url_is_the_workspaces(url: str) -> None:
    created = await ok(
        url,
        "workspaces",
        "create",
        "remote",
        "--delivery",
        "http",
        "--workspace-url",
        "http://10.0.0.7:9000",
        "--url",
        url,
        "--json",
    )

    assert created.json()["workspace"]["url"] == "http://10.0.0.7:9000"


async def test_wait_returns_once_the_condition_holds(url: str) -> None:
    workspace_id, token = await create(url, "waited-for")
    waiter = asyncio.create_task(
        cli(url, "wait", workspace_id, "--for", "status=online", "--timeout", "30s")
    )
    await asyncio.sleep(0)  # the wait starts before the heartbeat, which may come any time
    await heartbeat(url, workspace_id, token)

    result = await waiter

    assert result.code == 0, result
    assert "status online" in result.out


async def test_wait_times_out_with_exit_1(url: str) -> None:
    workspace_id, _ = await create(url, "never-online")

    result = await cli(url, "wait", workspace_id, "--for", "status=online", "--timeout", "0.3s")

    assert result.code == 1
    assert "still provisioning after 0.3 s" in result.err


async def test_list_outputs_and_the_100_column_table(url: str) -> None:
    names = [f"agent-with-a-rather-long-name-{n}" for n in range(3)]
    for name in names:
        await create(url, name)
    gone, _ = await create(url, "deleted-one")
    await ok(url, "workspaces", "delete", gone)

    table = (await ok(url, "workspaces", "list")).out.splitlines()
    by_name = (await ok(url, "workspaces", "list", "-o", "name")).out.splitlines()
    wide = (await ok(url, "workspaces", "list", "-o", "wide")).out.splitlines()
    as_json = (await ok(url, "workspaces", "list", "-o", "json")).json()
    with_removed = await ok(url, "workspaces", "list", "--include-removed", "-o", "name")

    assert table[0].split() == ["ID", "NAME", "STATUS", "SYNC", "BEAT"]
    assert all(len(line) <= 100 for line in table), table
    assert sorted(by_name) == sorted(names)
    assert "LABELS" in wide[0] and "DELIVERY" in wide[0]
    assert sorted(w["name"] for w in as_json["workspaces"]) == sorted(names)
    assert "deleted-one" in with_removed.out.splitlines()


async def test_operator_commands_do_what_they_say(url: str, plugin_sources: Path) -> None:
    plugin = write_tree(plugin_sources / "tools", {"main.py": "print('tools')\n"})
    workspace_id, token = await create(url, "operated")
    await heartbeat(url, workspace_id, token)

    declared = await ok(
        url, "workspaces", "plugins", "set", workspace_id, f"file://{plugin}", "--json"
    )
    assert [p["name"] for p in declared.json()["declared_plugins"]] == ["tools"]
    history = (await ok(url, "reconcile", "history", workspace_id, "--json")).json()
    assert {r["trigger"] for r in history["reconciles"]} >= {"online_transition"}
    newest = history["reconciles"][0]["id"]
    shown = (await ok(url, "reconcile", "show", newest, "--json")).json()
    assert shown["id"] == newest
    fanned = (await ok(url, "reconcile", "fanout", "--name", "tools", "--json")).json()
    assert fanned["queued"] == 1
    fleet = (await ok(url, "fleet", "--json")).json()
    assert fleet["statuses"]["online"] == 1

    rotated = (await ok(url, "workspaces", "rotate", workspace_id, "--json")).json()
    assert (await heartbeat(url, workspace_id, rotated["token"]))["status"] == "online"
    cleared = await ok(url, "workspaces", "plugins", "set", workspace_id, "--none", "--json")
    assert cleared.json()["declared_plugins"] == []
    both = await cli(
        url, "workspaces", "plugins", "set", workspace_id, f"file://{plugin}", "--none"
    )
    assert both.code == 2


async def test_events_without_follow_are_the_fleets_history_with_names(url: str) -> None:
    first, first_token = await create(url, "first-one")
    second, second_token = await create(url, "second-one")
    await heartbeat(url, first, first_token)
    await heartbeat(url, second, second_token)

    history = (await ok(url, "events", "--json")).json()["events"]
    table = (await ok(url, "events")).out
    limited = (await ok(url, "events", "--limit", "1", "--json")).json()["events"]
    one = (await ok(url, "workspaces", "events", second, "--json")).json()["events"]

    flips = [(e["workspace_name"], e["to"]) for e in history if e["kind"] == "status"]
    assert ("first-one", "online") in flips and ("second-one", "online") in flips
    assert "first-one" in table and "second-one" in table
    assert limited == history[:1]
    assert {e["workspace_id"] for e in one} == {second}
    after = (await ok(url, "events", "--after", str(history[0]["id"]), "--json")).json()
    # The heartbeats' reconciles write their outcome events when they finish, which under load
    # can be after `history` was read: `--after` returns what followed, newer events included.
    assert after["events"][: len(history) - 1] == history[1:]
    assert all(e["id"] > history[0]["id"] for e in after["events"])


async def test_fleet_history_shows_the_minutes_counts_the_dashboard_charts(url: str) -> None:
    workspace, token = await create(url, "charted")
    await heartbeat(url, workspace, token)

    view = (await ok(url, "fleet", "history", "--minutes", "2", "--json")).json()
    table = (await ok(url, "fleet", "history", "--minutes", "2")).out.splitlines()
    refused = await cli(url, "fleet", "history", "--minutes", "61")

    assert view["bucket_s"] == 60
    assert len(view["points"]) == 3  # two minutes back, and now
    assert view["points"][-1]["statuses"]["online"] == 1
    assert table[0].split() == [
        "AT",
        "PROVISIONING",
        "ONLINE",
        "DEGRADED",
        "OFFLINE",
        "FAILED",
        "PAUSED",
    ]
    assert len(table) == 4 and table[-1].split()[-5:] == ["1", "0", "0", "0", "0"]
    assert refused.code == 2 and "minutes" in refused.err


async def test_reconcile_id_still_means_reconcile_run(url: str) -> None:
    workspace_id, token = await create(url, "old-spelling")
    await heartbeat(url, workspace_id, token)

    old = (await ok(url, "reconcile", workspace_id, "--json")).json()
    new = (await ok(url, "--json", "reconcile", "run", workspace_id)).json()

    assert old["status"] == new["status"] == "succeeded"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_know_the_commands(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("workspaces", "reconcile", "fanout", "--include-removed", "--workspace-url"):
        assert word in script, word


def test_the_help_examples_are_valid_commands() -> None:
    """Every example `registry --help` shows parses (they are what users copy)."""
    examples = [
        shlex.split(line.split("#")[0] if " # " in line else line)[1:]
        for line in EXAMPLES.splitlines()
        if line.strip().startswith("registry ")
    ]
    assert len(examples) >= 8
    for argv in examples:
        _parser().parse_args(_with_reconcile_run(argv))
