"""JSON out through orjson, with the types our records carry."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


def _default(value: Any) -> Any:
    # asyncpg returns its own UUID subclass, which orjson does not serialise natively.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def json_response(value: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type=JSON_CONTENT_TYPE)
