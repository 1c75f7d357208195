"""Query-string and header parameters, parsed strictly: a value that is present must be valid.

An empty value is not the same as an absent one: a pager that sends `cursor=` must not be
handed the first page again (it would loop forever), and `workspace_id=` must not widen a
filter to the whole fleet. Integers are plain ASCII digits: `int()` alone would also take
`+2`, `1_0`, ` 2 ` and non-ASCII digits, which no client means to send.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from registry.errors import InvalidField

_DIGITS = re.compile(r"[0-9]+", re.ASCII)
# More digits than any bigint has: refuse before converting a megabyte-long number.
_MAX_DIGITS = 19


def _present(values: Mapping[str, str], name: str) -> str | None:
    raw = values.get(name)
    if raw == "":
        raise InvalidField(f"{name} must not be empty", field=name)
    return raw


def query_text(request: web.Request, name: str) -> str | None:
    """The parameter's value, None when absent; present but empty is a 400."""
    return _present(request.query, name)


def canonical_int(raw: str, field: str, *, minimum: int, maximum: int, what: str) -> int:
    if len(raw) > _MAX_DIGITS or not _DIGITS.fullmatch(raw):
        raise InvalidField(f"{field} must be {what}", field=field)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidField(f"{field} must be between {minimum} and {maximum}", field=field)
    return value


def query_int(request: web.Request, name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = query_text(request, name)
    if raw is None:
        return default
    return canonical_int(raw, name, minimum=minimum, maximum=maximum, what="an integer")


def query_uuid(request: web.Request, name: str) -> uuid.UUID | None:
    raw = query_text(request, name)
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidField(f"{name} must be a UUID", field=name) from None


def header_text(request: web.Request, name: str) -> str | None:
    """A header's value, None when absent; present but empty is a 400 naming the header."""
    return _present(request.headers, name)


def query_bool(request: web.Request, name: str) -> bool:
    """?name=true|false (absent: false); anything else, empty included, is a 400."""
    raw = query_text(request, name)
    if raw is None or raw == "false":
        return False
    if raw == "true":
        return True
    raise InvalidField(f"{name} must be true or false", field=name)


def query_list(request: web.Request, name: str) -> list[str]:
    """Several values: `?status=a,b` or `?status=a&status=b` (or both); every value must be
    non-empty, so `status=` or `status=a,` cannot quietly mean "any"."""
    values = []
    for raw in request.query.getall(name, []):
        for value in raw.split(","):
            if not value.strip():
                raise InvalidField(f"{name} must not have an empty value", field=name)
            values.append(value.strip())
    return values


# The query parameters each management route takes; anything else is a 400 naming it, so a
# script that filters with a parameter this registry does not know (`?plugins_sync=` on an
# old one, a typo) is refused instead of acting on the whole fleet. A route missing from the
# table takes none (tests/test_query_strict.py checks every route has its row).
ALLOWED_PARAMETERS: dict[str, frozenset[str]] = {
    "get_healthz": frozenset(),
    "get_readyz": frozenset(),
    "get_buildinfo": frozenset(),
    "get_openapi": frozenset(),
    "get_metrics": frozenset(),
    "post_workspaces": frozenset(),
    "get_workspaces": frozenset(
        {
            "status",
            "plugins_sync",
            "selector",
            "name_prefix",
            "has",
            "cursor",
            "limit",
            "include_removed",
        }
    ),
    "get_workspace": frozenset(),
    "get_workspace_by_name": frozenset(),
    "patch_workspace_labels": frozenset(),
    "put_workspace_labels": frozenset(),
    "delete_workspace": frozenset(),
    "post_pause": frozenset(),
    "post_resume": frozenset(),
    "post_token": frozenset(),
    "get_workspace_events": frozenset({"after", "limit"}),
    "get_events": frozenset({"workspace_id", "after"}),
    "get_event_history": frozenset({"workspace_id", "after", "limit"}),
    "get_fleet": frozenset(),
    "get_fleet_history": frozenset({"minutes"}),
    "put_workspace_plugins": frozenset(),
    "post_workspace_reconcile": frozenset(),
    "get_workspace_reconciles": frozenset({"limit"}),
    "post_plugins_reconcile": frozenset(),
    "get_reconcile": frozenset(),
    "post_tokens": frozenset(),
    "get_tokens": frozenset({"include_revoked"}),
    "delete_token": frozenset(),
    "post_guard_ack": frozenset(),
    "get_root": frozenset(),
    "get_ui": frozenset(),
    "get_ui_asset": frozenset(),
    "post_ui_login": frozenset(),
    "post_ui_logout": frozenset(),
    "get_ui_session": frozenset(),
}
# Liberal on the runtime path: a runtime's unknown parameters are ignored and reported like
# its unknown body fields (registry/handlers/runtime.py), never refused.
RUNTIME_ROUTES = frozenset({"post_heartbeat", "post_register"})


def unknown_parameters(request: web.Request) -> list[str]:
    allowed = ALLOWED_PARAMETERS.get(request.match_info.route.name or "", frozenset())
    return sorted(set(request.query) - allowed)


@web.middleware
async def strict_query_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    name = request.match_info.route.name
    if name is None or name in RUNTIME_ROUTES or not request.query:
        return await handler(request)
    if unknown := unknown_parameters(request):
        raise InvalidField(
            f"unknown query parameter: {unknown[0]}", field=unknown[0], code="unknown_parameter"
        )
    for key, value in request.query.items():
        if not value:
            raise InvalidField(f"{key} must not be empty", field=key)
    return await handler(request)
