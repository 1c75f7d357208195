"""Logging: one JSON object per line (or readable text on a terminal), with request context.

Handlers and jobs pass `extra={"workspace_id": …, "reconcile_id": …}`; the request id is
added from a context variable set by the request-id middleware, so every line a request
causes carries it. Nothing here ever logs headers or bodies, so tokens never reach a log.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import re
import secrets
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from registry.errors import Handler

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Accept a caller's id only if it is short and plain: it is echoed into logs and headers.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        request_id = request_id_var.get()
        if request_id is not None:
            context["request_id"] = request_id
        if context:
            text += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return text


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """`fmt`: json, text, or auto (text on a terminal, JSON otherwise)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pgserver narrates every initdb/pg_ctl call at INFO; only its problems matter here.
    logging.getLogger("pgserver").setLevel(logging.WARNING)


REQUEST_ID = web.RequestKey("request_id", str)


# Generated ids: a random prefix per process and a counter. Unique across processes and
# restarts for practical purposes, and free: uuid4 costs a getrandom system call per request.
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    offered = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = offered if _SAFE_REQUEST_ID.match(offered) else new_request_id()
    token = request_id_var.set(request[REQUEST_ID])
    try:
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, names its request."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
