"""A smart-HTTP git server on loopback: aiohttp in front of `git http-backend` (CGI)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

ROOT = web.AppKey("root", Path)


async def _backend(request: web.Request) -> web.StreamResponse:
    root = request.app[ROOT]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_PROJECT_ROOT": str(root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "REQUEST_METHOD": request.method,
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query_string,
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "REMOTE_ADDR": "127.0.0.1",
    }
    if "Git-Protocol" in request.headers:
        env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
    body = await request.read()
    env["CONTENT_LENGTH"] = str(len(body))
    proc = await asyncio.create_subprocess_exec(
        "git",
        "http-backend",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(body)
    proc.stdin.close()
    response = web.StreamResponse()
    while (line := (await proc.stdout.readline()).rstrip(b"\r\n")) != b"":
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "status":
            response.set_status(int(value.split()[0]))
        else:
            response.headers[name] = value.strip()
    await response.prepare(request)
    complete = False
    try:
        # Streamed, so a client that stops reading stops the backend too (flow control).
        while chunk := await proc.stdout.read(65536):
            await response.write(chunk)
        complete = True
    except ConnectionError:
        pass  # the client stopped reading and hung up: what the caps make git do
    finally:
        if not complete:
            proc.kill()
        # Read to EOF: asyncio reports the exit only once the pipes are closed, and a paused
        # reader with data left would never see it.
        await proc.communicate()
    return response


@asynccontextmanager
async def git_http_server(root: Path) -> AsyncIterator[str]:
    """Serve the repositories under ``root``; yields the base URL (http://127.0.0.1:port)."""
    app = web.Application()
    app[ROOT] = root
    app.router.add_route("*", "/{path:.*}", _backend)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
