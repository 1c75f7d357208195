"""The one route table; every route is named after its handler."""

from __future__ import annotations

from aiohttp import web

from registry.handlers import operations, runtime, workspaces


def setup_routes(app: web.Application) -> None:
    table = [
        ("GET", "/healthz", operations.get_healthz),
        ("GET", "/readyz", operations.get_readyz),
        ("GET", "/buildinfo", operations.get_buildinfo),
        ("POST", "/registry/heartbeat", runtime.post_heartbeat),
        ("POST", "/registry/register", runtime.post_register),
        ("POST", "/workspaces", workspaces.post_workspaces),
        ("GET", "/workspaces/{id}", workspaces.get_workspace),
    ]
    for method, path, handler in table:
        app.router.add_route(method, path, handler, name=handler.__name__)
