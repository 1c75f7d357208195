"""Command line: run the registry (`serve`, `migrate`) and operate one over HTTP.

Client commands talk to a running registry at --url (or REGISTRY_URL, default
http://127.0.0.1:8080; `host:port` without a scheme means http) with the token from --token
(or REGISTRY_ADMIN_TOKEN, or the development token a local `registry serve` keeps in
$REGISTRY_DATA_DIR/admin-token). Exit codes are listed at the end of --help.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import shtab

from registry import __version__, cli_labels, cli_operate, cli_tokens
from registry import cli_format as fmt
from registry.buildinfo import build_info
from registry.cli_base import (
    DEFAULT_URL,
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    client_options,
    client_parser,
    duration,
    emit,
    error,
    error_document,
    exit_code,
    note,
    plugin,
    positive_int,
    registry_url,
    workspace_id,
)
from registry.cli_client import JSON, Client, ClientError
from registry.dev_token import development_token, read_development_token, token_path
from registry.settings import Settings, SettingsError, default_data_dir, parse_workers

# The server's modules (the app, its pools, migrations, the embedded PostgreSQL) are imported
# by `serve` and `migrate` alone: every other command is an HTTP client, and importing the
# server for it cost each command about 1 s of CPU on 2 cores (0.4 s without).

log = logging.getLogger("registry")

SERVER_COMMANDS = ("serve", "migrate")


EXAMPLES = """\
examples:
  registry serve                                   # embedded PostgreSQL, 127.0.0.1:8080
  registry workspaces create ws-a --label env=prod --plugin git+https://github.com/acme/tools#main
  registry workspaces list --status offline,failed -l env=prod -o wide
  registry workspaces show ws-a                    # a name or an id, everywhere
  registry wait ws-a --for plugins_sync=synced --timeout 2m
  registry reconcile run ws-a                      # and wait for the outcome
  registry tokens create ci --role operate         # shown once
  registry events --follow
  registry --url registry.internal:8080 fleet
  source <(registry completion bash)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry",
        description=__doc__,
        epilog=f"{EXAMPLES}\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"registry {__version__}")
    client_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("serve", "serve the HTTP API; apply pending migrations meanwhile (503 until ready)"),
        ("migrate", "apply pending migrations and exit"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--dsn", help="PostgreSQL DSN (REGISTRY_DSN); default: embedded")
        if name == "serve":
            command.add_argument("--host", help="listen address (REGISTRY_HOST)")
            command.add_argument("--port", type=int, help="listen port (REGISTRY_PORT)")
            command.add_argument(
                "--workers",
                type=worker_count,
                metavar="N",
                help="processes answering on the port, or `auto`: one per CPU "
                "(REGISTRY_WORKERS; default 1)",
            )
    workspace_actions = _add_client_commands(commands)
    cli_operate.add_workspace_commands(workspace_actions)
    fleet_actions = cli_operate.add_commands(commands)
    cli_tokens.add_commands(commands, client_parser, fleet_actions)
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="print a shell completion script: `source <(registry completion bash)`, or "
        'for zsh `registry completion zsh > "${fpath[1]}/_registry"`',
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _add_client_commands(commands: Any) -> Any:
    """The workspace and reconcile commands; returns the `workspaces` group for more."""
    workspaces = commands.add_parser(
        "workspaces", help="create, inspect and operate workspaces", description="workspaces"
    )
    actions = workspaces.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = client_parser(
        actions,
        "create",
        "create a workspace; prints its token (shown once)",
        _create,
        examples="  registry workspaces create ws-a --plugin file:///srv/plugins/hello\n"
        "  registry workspaces create ws-b --delivery http --workspace-url http://10.0.0.7:9000",
    )
    create.add_argument("name")
    create.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        type=plugin,
        default=[],
        metavar="SOURCE[=NAME]",
        help="declare a plugin (repeatable); NAME defaults to the source's last path segment",
    )
    create.add_argument("--delivery", choices=("filesystem", "http"))
    create.add_argument(
        "--workspace-url", help="where the workspace's runtime is reached (http delivery)"
    )
    cli_labels.add_create_labels(create)

    listing = client_parser(
        actions,
        "list",
        "list workspaces (in id order, a page at a time; removed ones hidden)",
        _list,
        examples="  registry workspaces list --all -o name\n"
        "  registry workspaces list --status offline -o wide",
    )
    cli_labels.add_list_filters(listing)
    listing.add_argument("--limit", type=positive_int, help="page size (API default 100)")
    listing.add_argument("--cursor", help="continue after this next_cursor")
    listing.add_argument("--all", action="store_true", help="follow next_cursor to the end")
    listing.add_argument(
        "--include-removed", action="store_true", help="also list removed workspaces"
    )
    listing.add_argument(
        "-o",
        "--output",
        choices=fmt.LIST_OUTPUTS,
        default="table",
        help="table (fits 100 columns), wide, json, or name (one per line)",
    )

    cli_labels.add_labels_command(
        client_parser(
            actions,
            "labels",
            "show or change a workspace's labels",
            _labels,
            examples="  registry workspaces labels ws-a env=prod tier-\n"
            "  registry workspaces labels ws-a env=prod --replace",
        )
    )
    show = client_parser(actions, "show", "a workspace: status, plugins, last reconcile", _show)
    show.add_argument("id", type=workspace_id)
    for action, help_text, run in (
        ("pause", "hold a workspace: heartbeats no longer promote it", _pause),
        ("resume", "release the hold (offline until its next heartbeat)", _resume),
        ("delete", "remove a workspace (its runtime is told to stop)", _delete),
    ):
        client_parser(actions, action, help_text, run).add_argument("id", type=workspace_id)

    reconcile = commands.add_parser(
        "reconcile",
        help="run a workspace's reconcile, read its history, or fan out a plugin update",
        description="reconcile run|history|fanout (`registry reconcile ID` = `reconcile run ID`)",
    )
    steps = reconcile.add_subparsers(dest="action", required=True, metavar="ACTION")
    run_now = client_parser(
        steps,
        "run",
        "reconcile a workspace's plugins and wait for the outcome",
        _reconcile,
        examples="  registry reconcile run ws-a --refresh --timeout 2m",
    )
    run_now.add_argument("id", type=workspace_id)
    run_now.add_argument(
        "--refresh", action="store_true", help="re-resolve refs and re-install moved sources"
    )
    run_now.add_argument("--no-wait", action="store_true", help="print the run and return")
    run_now.add_argument(
        "--timeout",
        type=duration,
        default=600.0,
        metavar="DURATION",
        help="give up waiting after this long (exit 1; default 600 s)",
    )
    cli_operate.add_reconcile_commands(steps)

    events = client_parser(
        commands,
        "events",
        "the fleet's (or a workspace's) event history, or --follow the live stream",
        _events,
        examples="  registry events --limit 50\n  registry events --workspace ws-a --follow",
    )
    events.add_argument("--workspace", type=workspace_id, metavar="ID")
    events.add_argument("--follow", action="store_true", help="stream events until Ctrl-C")
    events.add_argument("--after", type=int, metavar="N", help="only events after event id N")
    events.add_argument(
        "--limit", type=positive_int, metavar="N", help="history: at most N events (default all)"
    )
    return actions


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"dsn": args.dsn}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port, workers=args.workers)
    return Settings.from_env(**overrides)


def _database(settings: Settings) -> tuple[str, Any]:
    if settings.dsn is not None:
        return settings.dsn, None
    from registry.embedded_pg import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir / "postgres")


def _serve(settings: Settings, dsn: str, argv: list[str]) -> int:
    from registry.startup import serve
    from registry.workers import Worker

    worker = Worker.from_env()
    settings = _with_admin_token(settings)
    if settings.workers > 1 and not worker.shares_port:
        return _supervise(settings, dsn, argv)
    settings.resolved_plugins_dir.mkdir(parents=True, exist_ok=True)
    info = build_info()
    log.info(
        "registry %s (git %s) listening on http://%s:%d",
        info["version"],
        info["git_sha"] or "unknown",
        settings.host,
        settings.port,
        extra={"build": info, "worker": worker.index},
    )
    _tune_garbage_collector()
    # Listens at once and answers 503 `starting` until migrations are applied and the app
    # has started (registry/startup.py).
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, dsn, worker))
    return 0


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    try:
        import uvloop  # optional: imported only when asked for
    except ImportError:
        raise SettingsError("REGISTRY_EVENT_LOOP=uvloop: uvloop is not installed") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _supervise(settings: Settings, dsn: str, argv: list[str]) -> int:
    """The workers are this same command again, told which one each is (registry/workers.py);
    what the supervisor resolved (the embedded database, the development token) they inherit."""
    from registry.startup import StartupError
    from registry.workers import Supervisor, check_port_free

    try:
        check_port_free(settings.host, settings.port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
    env = {**os.environ, "REGISTRY_DSN": dsn}
    if settings.admin_token is not None:
        env["REGISTRY_ADMIN_TOKEN"] = settings.admin_token
    log.info(
        "registry serve: %d workers on http://%s:%d",
        settings.workers,
        settings.host,
        settings.port,
    )
    supervisor = Supervisor([sys.executable, "-m", "registry", *argv], env, settings.workers)
    return supervisor.run(settings.shutdown_grace_s)


def worker_count(raw: str) -> int:
    try:
        return parse_workers(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: a positive integer or `auto`") from None


def _with_admin_token(settings: Settings) -> Settings:
    if settings.admin_token is None:
        # Development convenience only: made once, kept (mode 0600) in the data dir, so a
        # restart does not log out a running `events --follow`; the CLI reads it from there.
        token, made = development_token(settings.data_dir)
        where = token_path(settings.data_dir)
        if made:
            print(f"REGISTRY_ADMIN_TOKEN not set; development admin token: {token}", flush=True)
            print(f"(kept in {where}; the CLI on this machine uses it)", flush=True)
        else:
            print(f"REGISTRY_ADMIN_TOKEN not set; development admin token kept in {where}")
        settings = dataclasses.replace(settings, admin_token=token)
    return settings


def _tune_garbage_collector() -> None:
    """Fewer, cheaper collections: the heartbeat path allocates many short-lived objects and
    each full collection walks every long-lived one (modules, settings, pools); frozen, those
    are skipped. Collections were a source of tail latency under load. The price: a reference
    cycle can wait a long time for the full pass, so per-request and per-connection code must
    leave none (registry/body.py, registry/protocol.py, tests/test_connection_cycles.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_with_reconcile_run(argv))
    if args.command == "completion":
        print(shtab.complete(parser, shell=args.shell), end="")
        return EXIT_OK
    if args.command not in SERVER_COMMANDS:
        return _client_main(args)
    from registry.db.migrate import MigrationError, migrate
    from registry.embedded_pg import EmbeddedPostgresError
    from registry.logs import configure_logging
    from registry.startup import StartupError

    configure_logging()
    try:
        settings = _settings(args)
        configure_logging(settings.log_format, settings.log_level)
        dsn, _server = _database(settings)
        if args.command == "migrate":
            applied = asyncio.run(migrate(dsn))
            print(f"applied {len(applied)} migration(s)")
        else:
            return _serve(settings, dsn, argv)
    except (SettingsError, MigrationError, StartupError, EmbeddedPostgresError) as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2
    return 0


RECONCILE_ACTIONS = ("run", "history", "show", "fanout", "-h", "--help")
OPTIONS_WITH_VALUES = ("--url", "--registry-url", "--token")


def _with_reconcile_run(argv: list[str]) -> list[str]:
    """`registry reconcile ID` (how it was first spelled) means `registry reconcile run ID`."""
    position = 0
    while position < len(argv) and argv[position].startswith("-"):
        position += 2 if argv[position] in OPTIONS_WITH_VALUES else 1
    command = position
    if command < len(argv) and argv[command] == "reconcile":
        following = argv[command + 1 : command + 2]
        if following and following[0] not in RECONCILE_ACTIONS:
            return [*argv[: command + 1], "run", *argv[command + 1 :]]
    return argv


# Client commands.


def _client_main(args: argparse.Namespace) -> int:
    token = (
        args.token
        or os.environ.get("REGISTRY_ADMIN_TOKEN")
        or read_development_token(_data_dir_from_env())
    )
    if not token:
        error(
            "no admin token: pass --token or set REGISTRY_ADMIN_TOKEN"
            " (a development registry on this machine keeps one in its data dir)"
        )
        return EXIT_USAGE
    try:
        url = args.registry_url or registry_url(os.environ.get("REGISTRY_URL") or DEFAULT_URL)
    except argparse.ArgumentTypeError as exc:
        error(f"REGISTRY_URL: {exc}")
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args.run, url, token, args))
    except ClientError as exc:
        if args.json:
            print(json.dumps(error_document(exc), indent=2, ensure_ascii=False), flush=True)
        error(str(exc))
        return exit_code(exc)
    except KeyboardInterrupt:
        # Ctrl-C is how `events --follow` ends; anything else was interrupted.
        return EXIT_OK if args.command == "events" else 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, not even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _data_dir_from_env() -> Path:
    """Where `serve` keeps its development token, by the same settings it reads."""
    configured = os.environ.get("REGISTRY_DATA_DIR")
    return Path(configured) if configured else default_data_dir()


async def _run(run: Command, url: str, token: str, args: argparse.Namespace) -> int:
    async with Client(url, token) as api:
        await cli_labels.resolve_workspace_refs(api, args)
        return await run(api, args)


async def _create(api: Client, args: argparse.Namespace) -> int:
    result = await api.create_workspace(
        args.name,
        plugins=args.plugins,
        delivery=args.delivery,
        url=args.workspace_url,
        labels=cli_labels.create_labels(args),
    )
    if args.json:
        note("the token is shown only this once: store it now")
    emit(args, result, fmt.created(result))
    return EXIT_OK


async def _list(api: Client, args: argparse.Namespace) -> int:
    filters = cli_labels.list_params(args)
    page = await api.list_workspaces(**filters, limit=args.limit, cursor=args.cursor)
    if args.all:
        collected = list(page["workspaces"])
        while page.get("next_cursor"):
            page = await api.list_workspaces(
                **filters, limit=args.limit, cursor=page["next_cursor"]
            )
            collected.extend(page["workspaces"])
        page = {"workspaces": collected, "next_cursor": None}
    output = "json" if args.json else args.output
    print(fmt.workspace_list(page, output), flush=True)
    if page.get("next_cursor") and output != "json":
        note(f"more workspaces: --cursor {page['next_cursor']} (or --all)")
    return EXIT_OK


async def _labels(api: Client, args: argparse.Namespace) -> int:
    view = await cli_labels.run_labels(api, args)
    emit(args, view, cli_labels.format_labels(view.get("labels")))
    return EXIT_OK


async def _show(api: Client, args: argparse.Namespace) -> int:
    view = await api.get_workspace(args.id)
    emit(args, view, fmt.workspace(view))
    return EXIT_OK


async def _pause(api: Client, args: argparse.Namespace) -> int:
    view = await api.workspace_action(args.id, "pause")
    emit(args, view, f"workspace {args.id} is {view['status']}")
    return EXIT_OK


async def _resume(api: Client, args: argparse.Namespace) -> int:
    view = await api.workspace_action(args.id, "resume")
    emit(args, view, f"workspace {args.id} is {view['status']} (until its next heartbeat)")
    return EXIT_OK


async def _delete(api: Client, args: argparse.Namespace) -> int:
    await api.delete_workspace(args.id)
    # 204 has no body; the tombstone is still readable, and is what --json prints.
    view = await api.get_workspace(args.id)
    emit(args, view, f"workspace {args.id} is {view['status']}")
    return EXIT_OK


async def _reconcile(api: Client, args: argparse.Namespace) -> int:
    run = await api.request_reconcile(args.id, refresh=args.refresh)
    if args.no_wait:
        emit(args, run, fmt.reconcile(run))
        return EXIT_OK
    run, finished = await _wait(api, run, args.timeout)
    emit(args, run, fmt.reconcile(run))
    if not finished:
        error(f"reconcile {run['id']} is still {run['status']} after {args.timeout:g} s")
        return EXIT_FAILED
    return EXIT_OK if run["status"] == "succeeded" else EXIT_FAILED


TERMINAL = ("succeeded", "failed")
FIRST_POLL_S = 0.2  # a converged run is usually done by then
POLL_S = 0.5
SPIN_S = 0.1
SPINNER = "|/-\\"


async def _wait(api: Client, run: JSON, timeout_s: float) -> tuple[JSON, bool]:
    """Poll the run until it is terminal or `timeout_s` passes; progress goes to stderr:
    a spinner line on a terminal, else one line whenever what it says changes."""
    tty = sys.stderr.isatty()
    started = time.monotonic()
    next_poll = started + FIRST_POLL_S
    shown = ""
    frame = 0
    try:
        while run["status"] not in TERMINAL:
            now = time.monotonic()
            if now - started >= timeout_s:
                return run, False
            line = fmt.progress(run)
            if tty:
                spin = SPINNER[frame % len(SPINNER)]
                sys.stderr.write(f"\r\x1b[2K{spin} {line} ({now - started:.0f} s)")
                sys.stderr.flush()
                frame += 1
            elif line != shown:
                note(line)
            shown = line
            await asyncio.sleep(SPIN_S if tty else max(0.0, next_poll - now))
            if time.monotonic() >= next_poll:
                run = await api.get_reconcile(run["id"])
                next_poll = time.monotonic() + POLL_S
    finally:
        if tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
    if not tty:
        note(fmt.progress(run))
    return run, True


async def _events(api: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        history = await api.event_history(
            workspace_id=args.workspace, after=args.after or 0, limit=args.limit
        )
        emit(args, {"events": history}, fmt.events_table(history))
        return EXIT_OK
    names = cli_operate.WorkspaceNames(api)
    async for event in api.follow_events(
        workspace_id=args.workspace, after=args.after, notify=note
    ):
        if args.json:
            print(json.dumps(event.data, ensure_ascii=False), flush=True)
        else:
            name = await names.name_of(event.data.get("workspace_id"))
            print(fmt.event_line(event.data, name), flush=True)
    return EXIT_OK
