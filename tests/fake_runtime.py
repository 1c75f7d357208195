"""A real HTTP server standing in for a workspace runtime that receives plugins."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Delivery:
    name: str
    sha: str
    files: dict[str, str]


@dataclass
class FakeRuntime:
    """Accepts `PUT /plugins/{name}`; can be told to fail the next N deliveries."""

    deliveries: list[Delivery] = field(default_factory=list)
    fail_next: int = 0
    fail_status: int = 503
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def put_plugin(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=self.fail_status, text="not now")
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
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/plugins/{name}", self.put_plugin)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
