"""The registry's HTTP connections: parser refusals answered with the JSON envelope, and the
limits aiohttp does not enforce on a connection (head timeout, head size, connection cap).

Parser refusals. A request line or header aiohttp cannot parse (a control character in a header
value, a line too long, a malformed method) never reaches the app or its middlewares: the
connection's `RequestHandler.handle_error` answers it in text/plain and logs an error with a
traceback whose message quotes the offending header line — for an `Authorization` header, the
token. Any client, unauthenticated, could fill the error log with secrets that way. aiohttp has
no supported hook for this (aio-libs/aiohttp#3287): `handler_args` reach the `RequestHandler`
but cannot change its error answer. So the runner builds connections from a small
`RequestHandler` subclass that answers parser refusals with API.md's envelope and logs one info
line per interval, naming the kind of error but never its message. Every other error keeps
aiohttp's handling (the app's middleware already renders everything a handler raises).

Limits (ConnectionLimits). Unbounded, aiohttp accepts 128 header fields of 8 KiB each (~1 MB
per request) and waits an hour (its keep-alive timeout) for a head that trickles in; a thousand
such clients held 2 GB. Here:
- a head (request line and headers) must arrive within `head_timeout_s` of the connection
  opening, or of its first byte on a kept-alive connection: else 408 and the connection closes;
- a head may hold at most `max_header_bytes` and `max_headers` fields: else 431. aiohttp checks
  the count and each field's size; the total is counted here, on the bytes of a head still
  arriving (so a partial head never holds more), and on a head that completed in one read;
- at most `max_connections` open connections: one more is answered 503 with Retry-After at
  once, without reading its request, and closed.
These errors are answered by the same handler, through aiohttp's own error path (an `_ErrInfo`
message queued as the parser does for a malformed request), so the envelope is the same.

No cycles. `serve` runs the full collection rarely (registry/cli.py), so anything a connection
leaves in a reference cycle stays for a long time under a flood: the handler breaks the three
it would leave (a queued parser error's traceback, the body it keeps, the closed transport's
own callback); tests/test_connection_cycles.py checks with the collector off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from registry.jsonio import dumps, json_response
from registry.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

# At most one log line per this many seconds, with the count of refusals since the last one:
# a flood of garbage costs one line, not one per request.
LOG_EVERY_S = 10.0
REFUSALS = ThrottledLog(log, logging.INFO, LOG_EVERY_S)
TURNED_AWAY = ThrottledLog(log, logging.WARNING, LOG_EVERY_S)

# A client turned away for the connection cap should wait about this long before retrying.
OVERLOADED_RETRY_AFTER_S = 1
# A turned-away connection is half-closed after its 503 and closed this much later: closing it
# at once, with the client's request unread, would reset it before the 503 is read.
TURN_AWAY_CLOSE_S = 2.0
# The parser's "too many headers" refusal carries no type of its own, only this message.
_TOO_MANY_HEADERS = "Too many headers received"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    head_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 32
    max_connections: int | None = None  # None: no cap
    # Told the reason ("connections") when a connection is turned away: the app's metric.
    turned_away: Callable[[str], None] | None = None

    def handler_args(self) -> dict[str, Any]:
        """What aiohttp's parser enforces itself: the count, and each field's size."""
        return {"max_headers": self.max_headers, "max_field_size": self.max_header_bytes}


class HeadTimeout(HttpProcessingError):
    code = 408


class HeadTooLarge(HttpProcessingError):
    code = 431


def _turn_away_bytes() -> bytes:
    body = dumps(
        {"error": {"code": "overloaded", "message": "too many open connections; retry later"}}
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {OVERLOADED_RETRY_AFTER_S}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


TURN_AWAY = _turn_away_bytes()


def _head_size(message: RawRequestMessage) -> int:
    # As sent, give or take the separators: request line plus "name: value\r\n" per field.
    return (
        len(message.method)
        + len(message.path)
        + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)
    )


def _break_transport_cycle(transport: asyncio.BaseTransport | None) -> None:
    """A closed socket transport of Python 3.11's selector loop still refers to itself (its
    `_read_ready_cb` is its own bound method): a cycle per connection, left for the cyclic
    collector, which `serve` runs rarely; with the heap around it pinned, RSS grew ~5 MB per
    1,000 aborted connections before levelling off. Closed, the transport never reads again
    (its reader is removed before connection_lost is called), so dropping the callback is
    safe; on loops without the attribute this does nothing."""
    if transport is not None and hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None


class EnvelopeRequestHandler(RequestHandler):
    """One connection: parser refusals become the JSON envelope; ConnectionLimits apply."""

    __slots__ = ("_awaiting_head", "_head_bytes", "_head_timer", "_last_body", "_limits")

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        # Between requests (and before the first): bytes that arrive are a head's.
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last request parsed: until it is complete, bytes are its, not a
        # head's (aiohttp reads the rest of an unread body after the answer, "lingering").
        self._last_body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        cap = self._limits.max_connections
        # len() of the server's own dict of connections: O(1) per accept.
        if cap is not None and manager is not None and len(manager._connections) >= cap:
            self._turn_away(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _turn_away(self, transport: asyncio.BaseTransport) -> None:
        # Never registered with the server and no task started: data is ignored (force close)
        # and connection_lost has nothing to undo (no manager).
        self._force_close = True
        self._manager = None
        assert isinstance(transport, asyncio.Transport)
        transport.write(TURN_AWAY)
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(TURN_AWAY_CLOSE_S, transport.close)
        if self._limits.turned_away is not None:
            self._limits.turned_away("connections")
        TURNED_AWAY.report(
            "turned away a connection: %d connections open (the cap)", self._limits.max_connections
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        # The body refers back to this connection (its protocol): no cycle once it is over.
        body, self._last_body = self._last_body, None
        # Answered, with its body still arriving: aiohttp's lingering read would wait out its
        # 10 s for bytes that can no longer come, holding the connection meanwhile.
        lingering = body is not None and not body.is_eof() and self._current_request is None
        transport = self.transport
        super().connection_lost(exc)
        if lingering:
            assert body is not None
            body.feed_eof()
        _break_transport_cycle(transport)

    def data_received(self, data: bytes) -> None:
        if (
            not self._awaiting_head
            or self._force_close
            or self._close
            or (self._last_body is not None and not self._last_body.is_eof())
        ):
            super().data_received(data)  # a body, or ignored
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._head_complete(queued, len(data))
            return
        self._head_bytes += len(data)
        if self._head_bytes > self._limits.max_header_bytes:
            self._refuse(HeadTooLarge(message="request head too large"))
        elif self._head_timer is None:
            self._arm_head_timer()  # its first byte, on a kept-alive connection

    def _head_complete(self, queued: int, last_read: int) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        self._last_body = self._messages[-1][1]
        for index in range(queued, len(self._messages)):
            refused = self._messages[index][0]
            if isinstance(refused, _ErrInfo):
                # The parser's exception, queued: its traceback holds data_received's frame,
                # that frame this connection, the connection its queue: a cycle per refused
                # request (freed only by the rarely run full collection). Never logged, so
                # the traceback is not needed.
                refused.exc.__traceback__ = None
        seen, self._head_bytes = self._head_bytes, 0
        if seen + last_read <= self._limits.max_header_bytes:
            return  # the common case: a small request, nothing to measure
        # Heads that arrived (in part) in this read: measure each; the first too large and
        # everything after it is replaced by the 431.
        for index in range(queued, len(self._messages)):
            message = self._messages[index][0]
            if isinstance(message, RawRequestMessage) and (
                _head_size(message) > self._limits.max_header_bytes
            ):
                while len(self._messages) > index:
                    self._messages.pop()
                self._refuse(HeadTooLarge(message="request head too large"))
                return

    def _refuse(self, exc: HttpProcessingError) -> None:
        """Answer `exc` (408, 431) as the next message, then close: what follows on this
        connection is not read."""
        self._awaiting_head = False
        self._cancel_head_timer()
        self._messages.append(
            (_ErrInfo(status=exc.code, exc=exc, message=exc.message), EMPTY_PAYLOAD)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self._messages and not (self._force_close or self._close):
            self._refuse(HeadTimeout(message="request head timed out"))

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        # The next bytes on this connection (after the body, if it is still arriving) begin
        # the next head, unless a pipelined one is queued already.
        self._awaiting_head = not self._messages
        self._head_bytes = 0
        return answered

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        REFUSALS.report("refused a malformed HTTP request (%s)", type(exc).__name__)
        if request.writer.output_size > 0:
            # As aiohttp does: an answer already started cannot be replaced.
            raise ConnectionError("response already sent, cannot answer the parse error")
        status, code, text = self._refusal(exc)
        response = json_response({"error": {"code": code, "message": text}}, status=status)
        response.force_close()
        return response

    def _refusal(self, exc: HttpProcessingError) -> tuple[int, str, str]:
        """Status, code and message for a refused head; never the parser's own message, which
        quotes the request's bytes, headers included."""
        limits = self._limits
        if isinstance(exc, HeadTimeout):
            return (
                408,
                "request_timeout",
                f"the request head did not arrive within {limits.head_timeout_s:g} s",
            )
        too_large = (
            f"request headers too large: at most {limits.max_headers} fields and "
            f"{limits.max_header_bytes} bytes"
        )
        if isinstance(exc, HeadTooLarge):
            return 431, "headers_too_large", too_large
        if isinstance(exc, LineTooLong) and exc.args[1] == self.max_field_size:
            return 431, "headers_too_large", too_large
        if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
            return 431, "headers_too_large", too_large
        return (
            400,
            "bad_request",
            "malformed HTTP request: a request line or header could not be parsed "
            "(e.g. a control character in a header value)",
        )


class _EnvelopeServer(web.Server):
    """`web.Server` is the sites' protocol factory: each call makes one connection handler."""

    limits: ConnectionLimits

    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class EnvelopeAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections use EnvelopeRequestHandler, under `limits`.

    The app builds its `web.Server` (with the app's handler, request factory and handler
    arguments); only the class that makes connections changes, which is all the subclass adds.
    """

    def __init__(
        self, app: web.Application, *, limits: ConnectionLimits | None = None, **kwargs: Any
    ) -> None:
        self.limits = limits or ConnectionLimits()
        super().__init__(app, **self.limits.handler_args(), **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer
        assert isinstance(server, _EnvelopeServer)
        server.limits = self.limits
        return server
