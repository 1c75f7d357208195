"""HTTP request counters and latency for every route, labelled by route name.

By the route's name (its handler's), never the raw path: `/workspaces/{id}` is one series,
not one per workspace id, so the label set stays as small as the route table.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from registry.errors import CLIENT_GONE_STATUS, Handler
from registry.keys import METRICS

# Anything else (a scanner's PROPFIND) is counted as `other`: a method label from the request
# line would let a client grow the series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def route_name(request: web.Request) -> str:
    name = request.match_info.route.name
    return name if name else UNMATCHED


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Outermost: it sees the status the error middleware rendered, and the whole time.
    started = time.perf_counter()
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except web.HTTPException as exc:
        code = exc.status
        raise
    except asyncio.CancelledError:
        code = CLIENT_GONE_STATUS  # the client hung up (aiohttp cancels its handler)
        raise
    finally:
        metrics = request.app[METRICS]
        route = route_name(request)
        method = request.method if request.method in METHODS else "other"
        metrics.http_requests_by.get(route, method, str(code)).inc()
        metrics.http_seconds_by.get(route, method).observe(time.perf_counter() - started)
