"""The OpenAPI document of this service, kept in the repository next to the code."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi.json"


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")
