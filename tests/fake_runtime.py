"""A real HTTP server standing in for a workspace runtime that receives plugins."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Delivery:
    name: str
    sha: str
    files: dict[str, str]


@dataclass(frozen=True, order=True)
class Received:
    """One request as the runtime saw it: what the contract says a runtime must handle."""

    method: str
    path: str
    content_type: str | None
    plugin_sha: str | None


@dataclass(frozen=True)
class RawRequest:
    """One request in full: what tests/test_http_delivery_contract.py compares with the
    document's `webhooks`."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass
class FakeRuntime:
    """Serves exactly the runtime side of the http delivery contract (`webhooks` in
    registry/openapi.json):
    `PUT /plugins/{name}` installs a gzip tarball, `DELETE /plugins/{name}` removes it (404 when
    it is not there). Anything else is 404 and recorded. Can be told to fail the next N
    requests with a status."""

    deliveries: list[Delivery] = field(default_factory=list)
    removals: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    requests: list[RawRequest] = field(default_factory=list)
    fail_next: int = 0
    fail_status: int = 503
    server: TestServer | None = None
    _history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @web.middleware
    async def record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp keeps the body it read, so the handler can read it again.
        body = await request.read()
        self.requests.append(
            RawRequest(request.method, request.path, tuple(request.headers.items()), body)
        )
        self.received.append(
            Received(
                request.method,
                request.path,
                request.headers.get("Content-Type"),
                request.headers.get("X-Plugin-Sha"),
            )
        )
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=self.fail_status, text="not now")
        return await handler(request)

    def installed(self) -> set[str]:
        """Plugin names on the runtime now: delivered and not removed since."""
        present: set[str] = set()
        for method, name in self._history:
            (present.add if method == "PUT" else present.discard)(name)
        return present

    async def put_plugin(self, request: web.Request) -> web.Response:
        body = await request.read()
        files = {}
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            for member in archive.getmembers():
                if member.isfile():
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    files[member.name] = extracted.read().decode()
        self.deliveries.append(
            Delivery(request.match_info["name"], request.headers["X-Plugin-Sha"], files)
        )
        self._history.append(("PUT", request.match_info["name"]))
        return web.Response(status=204)

    async def delete_plugin(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.installed():
            return web.Response(status=404, text="no such plugin")
        self.removals.append(name)
        self._history.append(("DELETE", name))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application(middlewares=[self.record])
        app.router.add_put("/plugins/{name}", self.put_plugin)
        app.router.add_delete("/plugins/{name}", self.delete_plugin)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
