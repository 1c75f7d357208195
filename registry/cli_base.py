"""What every client command of the CLI shares: its options, argument types, output and
exit codes."""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from registry.cli_client import ApiError, Client, ClientError, Unreachable
from registry.cli_labels import workspace_ref

DEFAULT_URL = "http://127.0.0.1:8080"

# Exit codes, for scripts (documented in `registry --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the API said no, or what was waited for did not happen
EXIT_USAGE = 2  # bad arguments, no token
EXIT_NOT_FOUND = 3  # no such workspace, run or token (404, or 410 for a removed workspace)
EXIT_CONFLICT = 4  # the state does not allow it (409), e.g. a name already taken
EXIT_UNAVAILABLE = 5  # no answer, or 503: try again later

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  the API refused (an error answer), a reconcile failed, or a wait timed out
  2  usage: bad arguments or no token
  3  not found: no such workspace, reconcile or token (404/410)
  4  conflict: the workspace's state does not allow it, or the name is taken (409)
  5  unavailable: the registry did not answer, or answered 503 (try again)"""

Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


def exit_code(exc: ClientError) -> int:
    if isinstance(exc, Unreachable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ApiError):
        if exc.status in (404, 410):
            return EXIT_NOT_FOUND
        if exc.status == 409:
            return EXIT_CONFLICT
        if exc.status == 503:
            return EXIT_UNAVAILABLE
    return EXIT_FAILED


def error_document(exc: ClientError) -> dict[str, Any]:
    """The error as `--json` prints it: the API's envelope, or one in the same shape."""
    if isinstance(exc, ApiError):
        error: dict[str, Any] = {"code": exc.code, "message": exc.message, "status": exc.status}
        if exc.field is not None:
            error["field"] = exc.field
    else:
        code = "unreachable" if isinstance(exc, Unreachable) else "client_error"
        error = {"code": code, "message": str(exc), "status": None}
    return {"error": error}


def registry_url(value: str) -> str:
    """A base URL; `host:port` without a scheme means http."""
    value = value.strip()
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        value = f"http://{value}"
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def client_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """--url, --token, --json, -o: accepted before or after the command.

    Below the top level they default to SUPPRESS, so a value given before the command is
    kept. `--url` always means the registry (a workspace's own URL is `--workspace-url`).
    """
    unset: Any = None if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        "--registry-url",
        dest="registry_url",
        metavar="URL",
        type=registry_url,
        default=unset,
        help=f"registry base URL, scheme optional (REGISTRY_URL; default {DEFAULT_URL})",
    )
    parser.add_argument("--token", default=unset, help="API token (REGISTRY_ADMIN_TOKEN)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="print the API's JSON instead of tables (errors too)",
    )


def client_parser(
    parent: Any,
    name: str,
    help_text: str,
    run: Command,
    *,
    examples: str | None = None,
) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = parent.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client_options(command)
    command.set_defaults(run=run)
    return command


def _uuid_argument(what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what} (a UUID): {value!r}") from None

    return parse


# A workspace id or name: names are resolved to ids before the command runs
# (registry/cli_labels.py).
workspace_id = workspace_ref
reconcile_id = _uuid_argument("reconcile id")


def plugin(value: str) -> dict[str, str]:
    """SOURCE or SOURCE=NAME (the name after the last `=`)."""
    source, sep, name = value.rpartition("=")
    if sep and source and name and "/" not in name and ":" not in name:
        return {"source": source, "name": name}
    return {"source": value}


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


DURATION = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value: str) -> float:
    """Seconds from `90`, `90s`, `1.5m`, `2h` or `500ms`."""
    match = DURATION.match(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration (like 60s, 5m, 1h): {value!r}")
    seconds = float(match["number"]) * UNIT_S[match["unit"] or "s"]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be longer than 0 s")
    return seconds


def error(message: str) -> None:
    print(f"registry: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)
    else:
        print(human, flush=True)
