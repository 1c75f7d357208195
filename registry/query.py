"""Query-string and header parameters, parsed strictly: a value that is present must be valid.

An empty value is not the same as an absent one: a pager that sends `cursor=` must not be
handed the first page again (it would loop forever), and `workspace_id=` must not widen a
filter to the whole fleet. Integers are plain ASCII digits: `int()` alone would also take
`+2`, `1_0`, ` 2 ` and non-ASCII digits, which no client means to send.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

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
