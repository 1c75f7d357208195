"""The in-flight cap: beyond REGISTRY_MAX_REQUESTS_IN_FLIGHT requests at once, 503 `overloaded`
with Retry-After, counted in `registry_turned_away{reason="requests_in_flight"}`.

Why a cap: every request in flight holds its head and body (up to the header and body limits)
and a task; without a cap, a burst of slow or greedy clients grows the process without bound
and every heartbeat waits behind them. Turning the excess away at once keeps the rest fast, and
Retry-After tells runtimes when to come back. The cost per request is one comparison and two
integer updates: the heartbeat path pays nothing more.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter

from registry.errors import Handler, Overloaded

# Neither counted nor turned away: probes and the scrape that shows what was turned away
# (cheap and few), and the event stream, which stays in flight for hours: counted, a few hundred
# idle subscribers would take the slots of every heartbeat. Streams hold a connection each,
# under the connection cap.
EXEMPT = frozenset({"/healthz", "/metrics", "/events"})


class Admission:
    def __init__(self, limit: int, turned_away: Counter) -> None:
        self.limit = limit
        self.in_flight = 0
        self._turned_away = turned_away.labels("requests_in_flight")

    def middleware(self) -> Middleware:
        @web.middleware
        async def admission_middleware(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            if request.path in EXEMPT:
                return await handler(request)
            if self.in_flight >= self.limit:
                self._turned_away.inc()
                raise Overloaded(f"more than {self.limit} requests in flight; retry later")
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return admission_middleware
