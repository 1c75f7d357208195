"""CLI commands for operating a fleet: `fleet`, `wait`, reconcile history and fan-out, and
the workspace commands beyond create/list/show (rotate, plugins set, events)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from registry import cli_format as fmt
from registry.cli_base import (
    EXIT_FAILED,
    EXIT_OK,
    client_parser,
    duration,
    emit,
    error,
    note,
    plugin,
    positive_int,
    reconcile_id,
    workspace_id,
)
from registry.cli_client import ApiError, Client
from registry.statuses import Status, Sync

WAIT_POLL_S = 0.5
WAITABLE = {"status": {s.value for s in Status}, "plugins_sync": {s.value for s in Sync}}


def _condition(value: str) -> tuple[str, str]:
    """`status=online` or `plugins_sync=synced`."""
    key, sep, wanted = value.partition("=")
    if not sep or key not in WAITABLE or wanted not in WAITABLE[key]:
        choices = "; ".join(f"{k}={'|'.join(sorted(v))}" for k, v in WAITABLE.items())
        raise argparse.ArgumentTypeError(f"expected {choices}, not {value!r}")
    return key, wanted


def add_workspace_commands(actions: Any) -> None:
    rotate = client_parser(
        actions,
        "rotate",
        "issue a new token for a workspace (shown once; the old one keeps working for its "
        "grace period)",
        _rotate,
    )
    rotate.add_argument("id", type=workspace_id)

    plugins = actions.add_parser(
        "plugins", help="change a workspace's declared plugins", description="plugins set"
    )
    plugin_actions = plugins.add_subparsers(dest="plugins_action", required=True)
    set_plugins = client_parser(
        plugin_actions,
        "set",
        "replace the declared plugins (a live workspace is reconciled: removals uninstall)",
        _set_plugins,
        examples="  registry workspaces plugins set ws-a git+https://github.com/acme/tools#v2\n"
        "  registry workspaces plugins set ws-a --none",
    )
    set_plugins.add_argument("id", type=workspace_id)
    set_plugins.add_argument("plugins", nargs="*", type=plugin, metavar="SOURCE[=NAME]")
    set_plugins.add_argument("--none", action="store_true", help="declare no plugins at all")

    events = client_parser(actions, "events", "a workspace's event history", _workspace_events)
    events.add_argument("id", type=workspace_id)
    events.add_argument("--after", type=int, default=0, metavar="N", help="after event id N")
    events.add_argument("--limit", type=positive_int, metavar="N", help="at most N events")


def add_reconcile_commands(steps: Any) -> None:
    history = client_parser(
        steps, "history", "a workspace's reconcile runs, newest first", _history
    )
    history.add_argument("id", type=workspace_id)
    history.add_argument("--limit", type=positive_int, default=20, help="runs (default 20)")

    show = client_parser(steps, "show", "one reconcile run with its steps", _show_run)
    show.add_argument("reconcile_id", type=reconcile_id, metavar="RUN_ID")

    fanout = client_parser(
        steps,
        "fanout",
        "refresh every live workspace that declares a plugin (by source or by name)",
        _fanout,
        examples="  registry reconcile fanout --source git+https://github.com/acme/tools#main\n"
        "  registry reconcile fanout --name tools",
    )
    which = fanout.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", help="the plugin's source, as declared")
    which.add_argument("--name", help="the plugin's name")


def add_commands(commands: Any) -> Any:
    """The commands of this module; returns `fleet`'s actions, for the others to add theirs."""
    fleet = client_parser(
        commands, "fleet", "the fleet at a glance: counts and the mass-expiry guard", _fleet
    )
    # Optional actions under `fleet`, so plain `fleet` still runs its own command.
    fleet_actions = fleet.add_subparsers(dest="fleet_action", required=False, metavar="ACTION")
    history = client_parser(
        fleet_actions,
        "history",
        "workspaces per status, a minute apart, over the last minutes (the dashboard's chart)",
        _fleet_history,
        examples="  registry fleet history --minutes 15",
    )
    history.add_argument(
        "--minutes", type=_minutes, default=60, help="how far back, 1 to 60 (default 60)"
    )
    wait = client_parser(
        commands,
        "wait",
        "wait until a workspace is in a status or sync state (for scripts)",
        _wait_for,
        examples="  registry wait ws-a --for status=online --timeout 60s\n"
        "  registry wait ws-a --for plugins_sync=synced --timeout 5m",
    )
    wait.add_argument("id", type=workspace_id)
    wait.add_argument(
        "--for",
        dest="condition",
        type=_condition,
        required=True,
        metavar="KEY=VALUE",
        help="status=STATUS or plugins_sync=SYNC",
    )
    wait.add_argument(
        "--timeout",
        type=duration,
        default=60.0,
        metavar="DURATION",
        help="give up after this long: exit 1 (default 60s)",
    )
    return fleet_actions


async def _rotate(api: Client, args: argparse.Namespace) -> int:
    result = await api.rotate_token(args.id)
    if args.json:
        note("the token is shown only this once: store it now")
    emit(args, result, fmt.block([(key, value) for key, value in result.items()]))
    return EXIT_OK


async def _set_plugins(api: Client, args: argparse.Namespace) -> int:
    if bool(args.plugins) == args.none:
        error("plugins set: give the plugins, or --none for no plugins")
        return 2
    view = await api.set_plugins(args.id, args.plugins)
    emit(args, view, fmt.workspace(view))
    return EXIT_OK


async def _workspace_events(api: Client, args: argparse.Namespace) -> int:
    history = await api.event_history(workspace_id=args.id, after=args.after, limit=args.limit)
    emit(args, {"events": history}, fmt.events_table(history))
    return EXIT_OK


async def _history(api: Client, args: argparse.Namespace) -> int:
    runs = await api.reconcile_history(args.id, limit=args.limit)
    emit(args, {"reconciles": runs}, fmt.reconciles_table(runs))
    return EXIT_OK


async def _show_run(api: Client, args: argparse.Namespace) -> int:
    run = await api.get_reconcile(args.reconcile_id)
    emit(args, run, fmt.reconcile(run))
    return EXIT_OK


async def _fanout(api: Client, args: argparse.Namespace) -> int:
    result = await api.fan_out(source=args.source, name=args.name)
    emit(args, result, f"{result['queued']} workspace(s) queued for a reconcile")
    return EXIT_OK


async def _fleet(api: Client, args: argparse.Namespace) -> int:
    view = await api.fleet()
    emit(args, view, fmt.fleet(view))
    return EXIT_OK


def _minutes(value: str) -> int:
    """What GET /fleet/history keeps: told here as a usage error (exit 2), before any request."""
    try:
        minutes = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of minutes: {value!r}") from None
    if not 1 <= minutes <= 60:
        raise argparse.ArgumentTypeError(f"from 1 to 60 minutes, not {minutes}")
    return minutes


async def _fleet_history(api: Client, args: argparse.Namespace) -> int:
    view = await api.fleet_history(args.minutes)
    emit(args, view, fmt.fleet_history(view))
    return EXIT_OK


async def _wait_for(api: Client, args: argparse.Namespace) -> int:
    key, wanted = args.condition
    deadline = time.monotonic() + args.timeout
    shown = None
    while True:
        view = await api.get_workspace(args.id)
        current = view.get(key)
        if current == wanted:
            emit(args, view, f"workspace {args.id}: {key} {current}")
            return EXIT_OK
        if current != shown:
            note(f"workspace {args.id}: {key} {current}, waiting for {wanted}")
            shown = current
        if time.monotonic() >= deadline:
            error(f"workspace {args.id}: {key} is still {current} after {args.timeout:g} s")
            return EXIT_FAILED
        await asyncio.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))


class WorkspaceNames:
    """Workspace names for streamed events, asked once per workspace."""

    def __init__(self, api: Client) -> None:
        self._api = api
        self._names: dict[str, str | None] = {}

    async def name_of(self, workspace: Any) -> str | None:
        if not isinstance(workspace, str):
            return None
        if workspace not in self._names:
            try:
                self._names[workspace] = str((await self._api.get_workspace(workspace))["name"])
            except ApiError:
                self._names[workspace] = None  # gone (pruned): the id will do
        return self._names[workspace]
