"""The one route table; every route is named after its handler."""

from __future__ import annotations

from aiohttp import web

from registry.handlers import openapi, operations, reconciles, runtime, workspaces


def setup_routes(app: web.Application) -> None:
    table = [
        ("GET", "/healthz", operations.get_healthz),
        ("GET", "/readyz", operations.get_readyz),
        ("GET", "/buildinfo", operations.get_buildinfo),
        ("GET", "/openapi.json", openapi.get_openapi),
        ("POST", "/registry/heartbeat", runtime.post_heartbeat),
        ("POST", "/registry/register", runtime.post_register),
        ("POST", "/workspaces", workspaces.post_workspaces),
        ("GET", "/workspaces/{id}", workspaces.get_workspace),
        ("PUT", "/workspaces/{id}/plugins", workspaces.put_workspace_plugins),
        ("POST", "/internal/workspaces/{id}/reconcile", reconciles.post_workspace_reconcile),
        ("GET", "/internal/workspaces/{id}/reconciles", reconciles.get_workspace_reconciles),
        ("POST", "/internal/plugins/reconcile", reconciles.post_plugins_reconcile),
        ("GET", "/internal/reconciles/{id}", reconciles.get_reconcile),
    ]
    for method, path, handler in table:
        app.router.add_route(method, path, handler, name=handler.__name__)
