"""Command line: run the registry (`serve`, `migrate`) and operate one over HTTP.

Client commands (`workspaces`, `reconcile`, `events`) talk to a running registry at --url
(or REGISTRY_URL, default http://127.0.0.1:8080) with the admin token from --token (or
REGISTRY_ADMIN_TOKEN, or the development token a local `registry serve` keeps in
$REGISTRY_DATA_DIR/admin-token). They exit 0 on success, 1 when the API or the network says no (or a
reconcile failed), 2 on bad usage or a missing token.
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
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from registry import __version__, cli_tokens
from registry import cli_format as fmt
from registry.buildinfo import build_info
from registry.cli_client import JSON, Client, ClientError
from registry.db.migrate import MigrationError, migrate
from registry.dev_token import development_token, read_development_token, token_path
from registry.embedded_pg import EmbeddedPostgresError, start_embedded_postgres
from registry.logs import configure_logging
from registry.settings import Settings, SettingsError, default_data_dir
from registry.startup import StartupError, serve

log = logging.getLogger("registry")

DEFAULT_URL = "http://127.0.0.1:8080"
SERVER_COMMANDS = ("serve", "migrate")
STATUSES = ("provisioning", "online", "degraded", "offline", "failed", "paused", "removed")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"registry {__version__}")
    _client_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "serve the HTTP API; apply pending migrations meanwhile (503 until ready)"),
        ("migrate", "apply pending migrations and exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dsn", help="PostgreSQL DSN (REGISTRY_DSN); default: embedded")
        if name == "serve":
            command.add_argument("--host", help="listen address (REGISTRY_HOST)")
            command.add_argument("--port", type=int, help="listen port (REGISTRY_PORT)")
    _add_client_commands(commands)
    return parser


def _client_options(
    parser: argparse.ArgumentParser, *, top_level: bool = False, url_flag: bool = True
) -> None:
    """--url/--registry-url, --token, --json: accepted before or after the command.

    Below the top level they default to SUPPRESS, so a value given before the command is
    kept. `workspaces create` has its own --url (the workspace's), hence `url_flag`.
    """
    unset: Any = None if top_level else argparse.SUPPRESS
    flags = ("--url", "--registry-url") if url_flag else ("--registry-url",)
    parser.add_argument(
        *flags,
        dest="registry_url",
        metavar="URL",
        default=unset,
        help=f"registry base URL (REGISTRY_URL; default {DEFAULT_URL})",
    )
    parser.add_argument("--token", default=unset, help="admin or API token (REGISTRY_ADMIN_TOKEN)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="print the API's JSON instead of tables",
    )


def _client_parser(
    parent: Any, name: str, help_text: str, run: Command, *, url_flag: bool = True
) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = parent.add_parser(
        name, help=help_text, description=help_text
    )
    _client_options(command, url_flag=url_flag)
    command.set_defaults(run=run)
    return command


def _workspace_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a workspace id (a UUID): {value!r}") from None


def _plugin(value: str) -> JSON:
    """SOURCE or SOURCE=NAME (the name after the last `=`)."""
    source, sep, name = value.rpartition("=")
    if sep and source and name and "/" not in name and ":" not in name:
        return {"source": source, "name": name}
    return {"source": value}


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def _add_client_commands(commands: Any) -> None:
    workspaces = commands.add_parser("workspaces", help="create, inspect and operate workspaces")
    actions = workspaces.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = _client_parser(
        actions,
        "create",
        "create a workspace; prints its token (shown once)",
        _create,
        url_flag=False,
    )
    create.add_argument("name")
    create.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        type=_plugin,
        default=[],
        metavar="SOURCE[=NAME]",
        help="declare a plugin (repeatable); NAME defaults to the source's last path segment",
    )
    create.add_argument("--delivery", choices=("filesystem", "http"))
    create.add_argument(
        "--url", dest="workspace_url", help="where the workspace is reached (http delivery)"
    )

    listing = _client_parser(
        actions, "list", "list workspaces (in id order, a page at a time)", _list
    )
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=_positive_int, help="page size (API default 100)")
    listing.add_argument("--cursor", help="continue after this next_cursor")
    listing.add_argument("--all", action="store_true", help="follow next_cursor to the end")

    show = _client_parser(actions, "show", "a workspace: status, plugins, last reconcile", _show)
    show.add_argument("id", type=_workspace_id)
    for action, help_text, run in (
        ("pause", "hold a workspace: heartbeats no longer promote it", _pause),
        ("resume", "release the hold (offline until its next heartbeat)", _resume),
        ("delete", "remove a workspace (its runtime is told to stop)", _delete),
    ):
        _client_parser(actions, action, help_text, run).add_argument("id", type=_workspace_id)

    reconcile = _client_parser(
        commands,
        "reconcile",
        "reconcile a workspace's plugins and wait for the outcome",
        _reconcile,
    )
    reconcile.add_argument("id", type=_workspace_id)
    reconcile.add_argument(
        "--refresh", action="store_true", help="re-resolve refs and re-install moved sources"
    )
    reconcile.add_argument("--no-wait", action="store_true", help="print the run and return")
    reconcile.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="give up waiting after S seconds (exit 1; default 600)",
    )

    events = _client_parser(
        commands, "events", "a workspace's history, or --follow the live stream", _events
    )
    events.add_argument("--workspace", type=_workspace_id, metavar="ID")
    events.add_argument("--follow", action="store_true", help="stream events until Ctrl-C")
    events.add_argument("--after", type=int, metavar="N", help="only events after event id N")
    cli_tokens.add_commands(commands, _client_parser)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"dsn": args.dsn}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port)
    return Settings.from_env(**overrides)


def _database(settings: Settings) -> tuple[str, Any]:
    if settings.dsn is not None:
        return settings.dsn, None
    return start_embedded_postgres(settings.data_dir / "postgres")


def _serve(settings: Settings, dsn: str) -> None:
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
    settings.resolved_plugins_dir.mkdir(parents=True, exist_ok=True)
    info = build_info()
    log.info(
        "registry %s (git %s) listening on http://%s:%d",
        info["version"],
        info["git_sha"] or "unknown",
        settings.host,
        settings.port,
        extra={"build": info},
    )
    _tune_garbage_collector()
    # Listens at once and answers 503 `starting` until migrations are applied and the app
    # has started (registry/startup.py).
    asyncio.run(serve(settings, dsn))


def _tune_garbage_collector() -> None:
    """Fewer, cheaper collections: the heartbeat path allocates many short-lived objects and
    each full collection walks every long-lived one (modules, settings, pools); frozen, those
    are skipped. Collections were a source of tail latency under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in SERVER_COMMANDS:
        return _client_main(args)
    configure_logging()
    try:
        settings = _settings(args)
        configure_logging(settings.log_format, settings.log_level)
        dsn, _server = _database(settings)
        if args.command == "migrate":
            applied = asyncio.run(migrate(dsn))
            print(f"applied {len(applied)} migration(s)")
        else:
            _serve(settings, dsn)
    except (SettingsError, MigrationError, StartupError, EmbeddedPostgresError) as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2
    return 0


# Client commands.


def _client_main(args: argparse.Namespace) -> int:
    token = (
        args.token
        or os.environ.get("REGISTRY_ADMIN_TOKEN")
        or read_development_token(_data_dir_from_env())
    )
    if not token:
        _error(
            "no admin token: pass --token or set REGISTRY_ADMIN_TOKEN"
            " (a development registry on this machine keeps one in its data dir)"
        )
        return EXIT_USAGE
    if args.command == "events" and not args.follow and args.workspace is None:
        _error("events: --workspace ID is required without --follow")
        return EXIT_USAGE
    url = args.registry_url or os.environ.get("REGISTRY_URL") or DEFAULT_URL
    try:
        return asyncio.run(_run(args.run, url, token, args))
    except ClientError as exc:
        _error(str(exc))
        return EXIT_FAILED
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
        return await run(api, args)


def _error(message: str) -> None:
    print(f"registry: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)
    else:
        print(human, flush=True)


async def _create(api: Client, args: argparse.Namespace) -> int:
    result = await api.create_workspace(
        args.name, plugins=args.plugins, delivery=args.delivery, url=args.workspace_url
    )
    if args.json:
        _note("the token is shown only this once: store it now")
    _emit(args, result, fmt.created(result))
    return EXIT_OK


async def _list(api: Client, args: argparse.Namespace) -> int:
    page = await api.list_workspaces(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.all:
        collected = list(page["workspaces"])
        while page.get("next_cursor"):
            page = await api.list_workspaces(
                status=args.status, limit=args.limit, cursor=page["next_cursor"]
            )
            collected.extend(page["workspaces"])
        page = {"workspaces": collected, "next_cursor": None}
    _emit(args, page, fmt.workspaces_table(page["workspaces"]))
    if page.get("next_cursor") and not args.json:
        _note(f"more workspaces: --cursor {page['next_cursor']} (or --all)")
    return EXIT_OK


async def _show(api: Client, args: argparse.Namespace) -> int:
    view = await api.get_workspace(args.id)
    _emit(args, view, fmt.workspace(view))
    return EXIT_OK


async def _pause(api: Client, args: argparse.Namespace) -> int:
    view = await api.workspace_action(args.id, "pause")
    _emit(args, view, f"workspace {args.id} is {view['status']}")
    return EXIT_OK


async def _resume(api: Client, args: argparse.Namespace) -> int:
    view = await api.workspace_action(args.id, "resume")
    _emit(args, view, f"workspace {args.id} is {view['status']} (until its next heartbeat)")
    return EXIT_OK


async def _delete(api: Client, args: argparse.Namespace) -> int:
    await api.delete_workspace(args.id)
    # 204 has no body; the tombstone is still readable, and is what --json prints.
    view = await api.get_workspace(args.id)
    _emit(args, view, f"workspace {args.id} is {view['status']}")
    return EXIT_OK


async def _reconcile(api: Client, args: argparse.Namespace) -> int:
    run = await api.request_reconcile(args.id, refresh=args.refresh)
    if args.no_wait:
        _emit(args, run, fmt.reconcile(run))
        return EXIT_OK
    run, finished = await _wait(api, run, args.timeout)
    _emit(args, run, fmt.reconcile(run))
    if not finished:
        _error(f"reconcile {run['id']} is still {run['status']} after {args.timeout:g} s")
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
                _note(line)
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
        _note(fmt.progress(run))
    return run, True


async def _events(api: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        history = await api.workspace_events(args.workspace, after=args.after or 0)
        _emit(args, {"events": history}, fmt.events_table(history))
        return EXIT_OK
    async for event in api.follow_events(
        workspace_id=args.workspace, after=args.after, notify=_note
    ):
        if args.json:
            print(json.dumps(event.data, ensure_ascii=False), flush=True)
        else:
            print(fmt.event_line(event.data), flush=True)
    return EXIT_OK
