"""The one route table; every route is named after its handler."""

from __future__ import annotations

from aiohttp import web

from registry.handlers import (
    events,
    guard,
    labels,
    openapi,
    operations,
    operator,
    reconciles,
    runtime,
    tokens,
    workspaces,
)
from registry.ui import handlers as ui

# Routes that health checkers and load balancers probe, often with HEAD.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


def setup_routes(app: web.Application) -> None:
    table = [
        ("GET", "/healthz", operations.get_healthz),
        ("GET", "/readyz", operations.get_readyz),
        ("GET", "/buildinfo", operations.get_buildinfo),
        ("GET", "/openapi.json", openapi.get_openapi),
        ("GET", "/metrics", operations.get_metrics),
        ("POST", "/registry/heartbeat", runtime.post_heartbeat),
        ("POST", "/registry/register", runtime.post_register),
        ("POST", "/workspaces", workspaces.post_workspaces),
        ("GET", "/workspaces", workspaces.get_workspaces),
        # Any name, braces and slashes included (percent-encoded by the client).
        ("GET", "/workspaces/by-name/{name:.+}", labels.get_workspace_by_name),
        ("GET", "/workspaces/{id}", workspaces.get_workspace),
        ("PATCH", "/workspaces/{id}/labels", labels.patch_workspace_labels),
        ("PUT", "/workspaces/{id}/labels", labels.put_workspace_labels),
        ("DELETE", "/workspaces/{id}", operator.delete_workspace),
        ("POST", "/workspaces/{id}/pause", operator.post_pause),
        ("POST", "/workspaces/{id}/resume", operator.post_resume),
        ("POST", "/workspaces/{id}/token", operator.post_token),
        ("GET", "/workspaces/{id}/events", events.get_workspace_events),
        ("GET", "/events", events.get_events),
        ("GET", "/events/history", events.get_event_history),
        ("GET", "/fleet", events.get_fleet),
        ("GET", "/fleet/history", events.get_fleet_history),
        ("PUT", "/workspaces/{id}/plugins", workspaces.put_workspace_plugins),
        ("POST", "/internal/workspaces/{id}/reconcile", reconciles.post_workspace_reconcile),
        ("GET", "/internal/workspaces/{id}/reconciles", reconciles.get_workspace_reconciles),
        ("POST", "/internal/plugins/reconcile", reconciles.post_plugins_reconcile),
        ("GET", "/internal/reconciles/{id}", reconciles.get_reconcile),
        # Issue 14: API tokens and the guard's acknowledgement.
        ("POST", "/tokens", tokens.post_tokens),
        ("GET", "/tokens", tokens.get_tokens),
        ("DELETE", "/tokens/{id}", tokens.delete_token),
        ("POST", "/fleet/guard/ack", guard.post_guard_ack),
        # Issue 17: the dashboard.
        ("GET", "/", ui.get_root),
        ("GET", "/ui/", ui.get_ui),
        ("GET", "/ui/static/{name}", ui.get_ui_asset),
        ("POST", "/ui/login", ui.post_ui_login),
        ("POST", "/ui/logout", ui.post_ui_logout),
        ("GET", "/ui/session", ui.get_ui_session),
    ]
    for method, path, handler in table:
        if path in PROBES:
            # add_get also answers HEAD (same handler, body dropped) for probes and balancers.
            app.router.add_get(path, handler, name=handler.__name__)
        else:
            app.router.add_route(method, path, handler, name=handler.__name__)
