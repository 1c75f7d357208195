"""CLI: workspace names in place of ids, labels, and the `workspaces list` filters.

Every command that takes a workspace takes its id or its name: the argument is parsed as a
`WorkspaceRef`, and `resolve_workspace_refs` turns the names among them into ids through
`GET /workspaces/by-name/{name}` before the command runs (names cannot look like UUIDs, so
the two never clash).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from registry.cli_client import JSON, Client, ClientError
from registry.statuses import Status, Sync

STATUSES = tuple(s.value for s in Status)
SYNCS = tuple(s.value for s in Sync)
HAS = ("refusal", "pending_restart", "failed_reconcile")  # registry/db/filters.py's HAS


class WorkspaceRef(str):
    """A workspace id or name as given on the command line."""

    __slots__ = ()

    @property
    def is_id(self) -> bool:
        try:
            uuid.UUID(self)
        except ValueError:
            return False
        return True


def workspace_ref(value: str) -> WorkspaceRef:
    if not value.strip():
        raise argparse.ArgumentTypeError("a workspace id or name is required")
    try:
        return WorkspaceRef(uuid.UUID(value))
    except ValueError:
        return WorkspaceRef(value)


async def resolve_workspace_refs(api: Client, args: argparse.Namespace) -> None:
    """Replace every workspace name among the parsed arguments by its id."""
    for key, value in vars(args).items():
        if isinstance(value, WorkspaceRef) and not value.is_id:
            view = await api.workspace_by_name(value)
            setattr(args, key, WorkspaceRef(view["id"]))


def _choices(options: tuple[str, ...]) -> Any:
    def parse(value: str) -> list[str]:
        values = [v.strip() for v in value.split(",")]
        for v in values:
            if v not in options:
                raise argparse.ArgumentTypeError(
                    f"invalid choice: {v!r} (choose from {', '.join(options)})"
                )
        return values

    return parse


def add_list_filters(listing: argparse.ArgumentParser) -> None:
    """The filters of `workspaces list` (its --include-removed is the list's own)."""
    add = listing.add_argument
    add(
        "--status",
        dest="statuses",
        action="extend",
        type=_choices(STATUSES),
        default=[],
        metavar="S[,S]",
        help="only these statuses (comma-separated or repeated)",
    )
    add(
        "--sync",
        dest="syncs",
        action="extend",
        type=_choices(SYNCS),
        default=[],
        metavar="X[,X]",
        help=f"only these plugins_sync states ({', '.join(SYNCS)})",
    )
    add(
        "-l",
        "--selector",
        metavar="SELECTOR",
        help="label selector, e.g. 'env=prod,tier!=canary,team,!legacy,zone in (a,b)'",
    )
    add("--name-prefix", metavar="PREFIX", help="only names starting with PREFIX")
    add(
        "--has",
        action="extend",
        type=_choices(HAS),
        default=[],
        metavar="H[,H]",
        help=f"only workspaces with each of these ({', '.join(HAS)})",
    )


def list_params(args: argparse.Namespace) -> dict[str, str]:
    """The filters as `GET /workspaces` query parameters."""
    params = {
        "status": ",".join(args.statuses),
        "plugins_sync": ",".join(args.syncs),
        "selector": args.selector or "",
        "name_prefix": args.name_prefix or "",
        "has": ",".join(args.has),
        "include_removed": "true" if args.include_removed else "",
    }
    # Absent, not empty: the API refuses an empty value.
    return {key: value for key, value in params.items() if value}


def label_assignment(value: str) -> tuple[str, str]:
    key, sep, label = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE: {value!r}")
    return key, label


def label_change(value: str) -> tuple[str, str | None]:
    """`key=value` sets, `key-` removes (kubectl's spelling)."""
    if "=" not in value and value.endswith("-") and len(value) > 1:
        return value[:-1], None
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY-: {value!r}")
    return label_assignment(value)


def add_create_labels(create: argparse.ArgumentParser) -> None:
    create.add_argument(
        "--label",
        dest="labels",
        action="append",
        type=label_assignment,
        default=[],
        metavar="KEY=VALUE",
        help="set a label (repeatable)",
    )


def create_labels(args: argparse.Namespace) -> dict[str, str] | None:
    return dict(args.labels) if args.labels else None


def add_labels_command(labels: argparse.ArgumentParser) -> None:
    labels.add_argument("id", type=workspace_ref, metavar="ID|NAME")
    labels.add_argument(
        "changes",
        nargs="*",
        type=label_change,
        metavar="KEY=VALUE|KEY-",
        help="set KEY to VALUE, or remove KEY (no changes: show the labels)",
    )
    labels.add_argument(
        "--replace", action="store_true", help="the given labels become the whole set"
    )


def format_labels(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "(none)"


async def run_labels(api: Client, args: argparse.Namespace) -> JSON:
    """The workspace after the change (as it is, without changes)."""
    changes: dict[str, str | None] = dict(args.changes)
    if args.replace:
        if None in changes.values():
            raise ClientError("--replace takes KEY=VALUE only: the whole new set")
        return await api.change_labels(args.id, changes, replace=True)
    if not changes:
        return await api.get_workspace(args.id)
    return await api.change_labels(args.id, changes, replace=False)
