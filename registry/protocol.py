"""Requests aiohttp's HTTP parser refuses: answered with the JSON envelope, logged without data.

A request line or header aiohttp cannot parse (a control character in a header value, a line
too long, a malformed method) never reaches the app or its middlewares: the connection's
`RequestHandler.handle_error` answers it in text/plain and logs an error with a traceback whose
message quotes the offending header line — for an `Authorization` header, the token. Any client,
unauthenticated, could fill the error log with secrets that way.

aiohttp has no supported hook for this (aio-libs/aiohttp#3287): `handler_args` reach the
`RequestHandler` but cannot change its error answer. So the runner builds connections from a
small `RequestHandler` subclass that answers parser refusals with API.md's envelope (400,
`bad_request`) and logs one info line per refusal, rate-limited, naming the kind of error but
never its message. Every other error keeps aiohttp's handling (the app's middleware already
renders everything a handler raises).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from registry.jsonio import json_response

log = logging.getLogger(__name__)

# At most one log line per this many seconds, with the count of refusals since the last one:
# a flood of garbage costs one line, not one per request.
LOG_EVERY_S = 10.0


class _RefusalLog:
    def __init__(self) -> None:
        self._last = float("-inf")
        self._suppressed = 0

    def refused(self, kind: str) -> None:
        now = time.monotonic()
        if now - self._last < LOG_EVERY_S:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        # The kind only: the parser's message quotes the request's bytes, headers included.
        log.info(
            "refused a malformed HTTP request (%s)%s",
            kind,
            f"; {suppressed} more since the last report" if suppressed else "",
        )


REFUSALS = _RefusalLog()


class EnvelopeRequestHandler(RequestHandler):
    """One connection; parser refusals become the JSON envelope."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        REFUSALS.refused(type(exc).__name__)
        if request.writer.output_size > 0:
            # As aiohttp does: an answer already started cannot be replaced.
            raise ConnectionError("response already sent, cannot answer the parse error")
        response = json_response(
            {
                "error": {
                    "code": "bad_request",
                    "message": "malformed HTTP request: a request line or header could not be "
                    "parsed (e.g. a control character in a header value)",
                }
            },
            status=status if 400 <= status < 500 else 400,
        )
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    """`web.Server` is the sites' protocol factory: each call makes one connection handler."""

    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class EnvelopeAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections use EnvelopeRequestHandler.

    The app builds its `web.Server` (with the app's handler, request factory and handler
    arguments); only the class that makes connections changes, which is all the subclass adds.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer
        return server
