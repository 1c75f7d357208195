"""Reading a request body: within REGISTRY_BODY_TIMEOUT_S, and without leaving a reference cycle
behind when the client hangs up.

The cycle. When a client disconnects mid-body, aiohttp stores the ConnectionResetError on the
request's body stream and raises that same object from every read. Raising it attaches the
reading frames to its traceback; those frames hold the request, the request holds the stream,
the stream holds the exception: a cycle per aborted request, with the request's headers (up to
the header limit) inside. Only the cyclic collector frees it, and `serve` tunes that collector
to run its full pass rarely (registry/cli.py): rounds of 1,000 aborted requests with ~1 MB of
headers each took the process from 2.1 to 5.6 GB in 6 rounds, for good. Here the stored
exception loses its traceback and a fresh one (not stored anywhere) is raised: reference
counting frees the request as soon as the handler returns.

The timeout. aiohttp waits for a body as long as the client keeps the connection open (a body
at 1 byte/s held a request for minutes). A body that has not arrived in full within the timeout
is answered 408 `request_timeout`; the stream is then failed, so aiohttp does not linger reading
the rest but closes the connection once the 408 is written.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from registry.errors import RequestTimeout


class ClientHungUp(ConnectionResetError):
    """The client closed the connection before its body arrived (registry.errors.client_gone)."""


class _BodyTimedOut(TimeoutError):
    """Left on the body stream after a 408: aiohttp's lingering read stops at it at once."""


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    stream = request.content
    if stream.is_eof():
        # The whole body is buffered already (a heartbeat arrives in one read): no timer.
        return await _read(request)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request)
    except TimeoutError:
        stream.set_exception(_BodyTimedOut())
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except ConnectionError as exc:
        # See the module docstring: break the stream -> exception -> frames -> request cycle.
        exc.__traceback__ = None
        raise ClientHungUp(*exc.args) from None
