"""`GET /workspaces` query parameters → the list's Filters (registry/db/filters.py)."""

from __future__ import annotations

from aiohttp import web

from registry import query
from registry.db.filters import HAS, Filters
from registry.errors import InvalidField
from registry.labels import parse_selector
from registry.statuses import Status, Sync

MAX_NAME_PREFIX = 128


def _choices(request: web.Request, name: str, options: tuple[str, ...]) -> tuple[str, ...]:
    values = query.query_list(request, name)
    for value in values:
        if value not in options:
            raise InvalidField(
                f"unknown {name}: {value[:64]!r} (one of: {', '.join(options)})", field=name
            )
    return tuple(dict.fromkeys(values))  # repeated values once, in the order given


def parse_filters(request: web.Request) -> Filters:
    selector = query.query_text(request, "selector")
    prefix = query.query_text(request, "name_prefix")
    if prefix is not None and (len(prefix) > MAX_NAME_PREFIX or "\x00" in prefix):
        raise InvalidField(
            f"name_prefix must be at most {MAX_NAME_PREFIX} characters, without NUL",
            field="name_prefix",
        )
    return Filters(
        statuses=_choices(request, "status", tuple(s.value for s in Status)),
        syncs=tuple(Sync(s) for s in _choices(request, "plugins_sync", tuple(Sync))),
        selector=None if selector is None else parse_selector(selector),
        name_prefix=prefix,
        has=_choices(request, "has", HAS),
        include_removed=query.query_bool(request, "include_removed"),
    )
