"""Request-body parsing: typed field readers that turn bad input into 400s naming the field."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from registry.body import read_body
from registry.errors import InvalidBody, InvalidField, NotFound
from registry.http_urls import is_http_url
from registry.keys import SETTINGS

Body = dict[str, Any]


async def read_json_object(request: web.Request) -> Body:
    raw = await read_body(request, request.app[SETTINGS].body_timeout_s)
    if not raw:
        raise InvalidBody("request body must be a JSON object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidBody("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidBody("request body must be a JSON object")
    return value


async def read_optional_json_object(request: web.Request) -> Body:
    """A body that may be left out entirely (an empty object then); if sent, as above."""
    return await read_json_object(request) if request.can_read_body else {}


def reject_unknown_fields(body: Body, allowed: Iterable[str]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidField(f"unknown field: {unknown[0]}", field=unknown[0], code="unknown_field")


def unknown_fields(body: Body, known: frozenset[str]) -> list[str]:
    """The fields of `body` outside `known`, sorted: what a tolerant reader ignores."""
    # The common case (nothing unknown) costs one subset test.
    if body.keys() <= known:
        return []
    return sorted(body.keys() - known)


def parse_uuid(value: object, field: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidField(f"{field} must be a UUID string", field=field)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidField(f"{field} must be a UUID string", field=field) from None


def path_uuid(request: web.Request, resource: str = "workspace") -> uuid.UUID:
    """The {id} of the URL path; anything but a UUID cannot name a resource: a 404."""
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound(
            f"no {resource} {request.match_info['id']!r}", code=f"{resource}_not_found"
        ) from None


def required(body: Body, field: str) -> Any:
    if field not in body or body[field] is None:
        raise InvalidField(f"{field} is required", field=field, code="missing_field")
    return body[field]


# A number's default: a float, or None for "not reported" where the caller keeps what it had.
_Default = TypeVar("_Default", float, None)


def number(
    body: Body, field: str, default: _Default, *, minimum: float, maximum: float
) -> float | _Default:
    value = body.get(field, default)
    if value is None:
        return default
    # bool is an int in Python, but `true` is not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(f"{field} must be a number", field=field)
    value = float(value)
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise InvalidField(f"{field} must be between {minimum:g} and {maximum:g}", field=field)
    return value


def integer(
    body: Body,
    field: str,
    default: int,
    *,
    minimum: int,
    maximum: int,
    integral_floats: bool = False,
) -> int:
    value = body.get(field, default)
    if value is None:
        return default
    # Runtimes written in languages without an integer type send `3.0`; it means 3.
    if integral_floats and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(f"{field} must be an integer", field=field)
    if not minimum <= value <= maximum:
        raise InvalidField(f"{field} must be between {minimum} and {maximum}", field=field)
    return value


def text(body: Body, field: str, default: str, *, max_length: int) -> str:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidField(f"{field} must be a string", field=field)
    if len(value) > max_length:
        raise InvalidField(f"{field} must be at most {max_length} characters", field=field)
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in the database.
        raise InvalidField(f"{field} must not contain NUL characters", field=field)
    return value


def http_url(body: Body, field: str, *, max_length: int = 2048) -> str | None:
    url = text(body, field, "", max_length=max_length) or None
    if url is not None and not is_http_url(url):
        raise InvalidField(
            f"{field} must be an http:// or https:// URL with a host (and a port of 0-65535), "
            "without spaces or control characters",
            field=field,
        )
    return url


def choice(body: Body, field: str, default: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    value = text(body, field, default, max_length=64)
    if value not in options:
        raise InvalidField(f"{field} must be one of: {', '.join(options)}", field=field)
    return value


def array(body: Body, field: str, *, max_items: int) -> list[Any] | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidField(f"{field} must be an array", field=field)
    if len(value) > max_items:
        raise InvalidField(f"{field} must have at most {max_items} items", field=field)
    return value


def item_object(value: object, field: str) -> Body:
    if not isinstance(value, dict):
        raise InvalidField(f"each item of {field} must be an object", field=field)
    return value
