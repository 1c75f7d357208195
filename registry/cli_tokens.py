"""CLI commands for named API tokens (`tokens create|list|revoke`, admin role) and for
acknowledging the mass-expiry guard (`fleet guard ack`, operate role).

Wired into registry/cli.py by one call, `add_commands(commands, client_parser)`, so this
module owns its parsers, HTTP calls and output; cli.py keeps the shared options and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from registry import cli_format as fmt
from registry.cli_client import JSON, Client

ROLES = ("read", "operate", "admin")

# cli._client_parser: adds a client command with the shared --url/--token/--json options.
ClientParser = Callable[..., argparse.ArgumentParser]

EXAMPLES = """\
examples:
  registry tokens create deploy-bot --role operate
  registry tokens create dashboards --role read --expires-at 2027-01-01T00:00:00Z
  registry tokens list --include-revoked
  registry tokens revoke deploy-bot
"""


def add_commands(commands: Any, client_parser: ClientParser, fleet_actions: Any) -> None:
    tokens = commands.add_parser(
        "tokens",
        help="named API tokens with a role (admin token needed)",
        description="Named API tokens: read (every GET, the event stream), operate (plus "
        "workspace actions, plugins, reconciles, guard ack), admin (plus tokens). Every "
        "action a token makes is recorded with its name as the event's actor.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = client_parser(
        actions, "create", "create a token; prints its secret (shown once)", _create
    )
    create.add_argument("name", help="a-z, 0-9, '.', '_', '-'; the actor of its events")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--expires-at", metavar="TIME", help="RFC 3339, e.g. 2027-01-01T00:00:00Z")
    listing = client_parser(actions, "list", "list tokens (never their secrets)", _list)
    listing.add_argument("--include-revoked", action="store_true")
    revoke = client_parser(actions, "revoke", "revoke a token at once", _revoke)
    # Not `token`: that is the --token option's dest.
    revoke.add_argument("ref", metavar="NAME_OR_ID")

    # `fleet` (registry/cli_operate.py) shows the fleet; `fleet guard ack` hangs below it.
    add_guard_ack(fleet_actions, client_parser)


def add_guard_ack(fleet_actions: Any, client_parser: ClientParser) -> None:
    guard = fleet_actions.add_parser("guard", help="the mass-expiry guard")
    guard_actions = guard.add_subparsers(dest="guard_action", required=True, metavar="ACTION")
    client_parser(
        guard_actions,
        "ack",
        "acknowledge the holding mass-expiry guard: the silence is real, expire at the "
        "normal pace until the guard lets go (operate token)",
        _guard_ack,
    )


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else human, flush=True)


async def _create(api: Client, args: argparse.Namespace) -> int:
    body: JSON = {"name": args.name, "role": args.role}
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    # The client's one request path (errors, timeouts), for routes it has no method for.
    result: JSON = await api._call("POST", "/tokens", json=body)
    print("the secret is shown only this once: store it now", file=sys.stderr, flush=True)
    token = result["token"]
    _emit(
        args,
        result,
        f"token {token['name']} ({token['role']}) created, id {token['id']}\n{result['secret']}",
    )
    return 0


async def _list(api: Client, args: argparse.Namespace) -> int:
    params = {"include_revoked": "true"} if args.include_revoked else None
    result: JSON = await api._call("GET", "/tokens", params=params)
    rows = [
        (
            t["name"],
            t["role"],
            fmt.when(t["created_at"]),
            t["created_by"],
            fmt.when(t["expires_at"]),
            fmt.when(t["revoked_at"]),
            t["id"],
        )
        for t in result["tokens"]
    ]
    headers = ("NAME", "ROLE", "CREATED", "BY", "EXPIRES", "REVOKED", "ID")
    _emit(args, result, fmt.table(headers, rows) if rows else "no tokens")
    return 0


async def _revoke(api: Client, args: argparse.Namespace) -> int:
    await api._call("DELETE", f"/tokens/{quote(args.ref, safe='')}")
    _emit(args, {"revoked": args.ref}, f"token {args.ref} revoked")
    return 0


async def _guard_ack(api: Client, args: argparse.Namespace) -> int:
    result: JSON = await api._call("POST", "/fleet/guard/ack")
    guard = result["mass_expiry_guard"]
    _emit(
        args,
        result,
        f"mass-expiry guard (holding since {fmt.when(guard['since'])}) acknowledged by "
        f"{guard['acknowledged_by']}: silent workspaces go offline at the normal pace",
    )
    return 0
