"""Management API: create and inspect workspaces, set their plugins (roles: registry/auth.py)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from aiohttp import web

from registry import audit, query
from registry import validation as v
from registry.auth import actor, hash_token, new_workspace_token
from registry.db import Connection, actions, events, fleet, reconciles, workspaces
from registry.db.clock import db_now
from registry.db.filters import declared_sources, list_filtered
from registry.db.workspaces import DeclaredPlugin
from registry.errors import (
    AlreadyExists,
    Forbidden,
    InvalidField,
    workspace_not_found,
    workspace_removed,
)
from registry.jsonio import json_response
from registry.keys import POOL, RECONCILER, SETTINGS, SOURCES
from registry.labels import parse_labels
from registry.list_filters import parse_filters
from registry.plugins import (
    PluginError,
    SourceDenied,
    SourceSettings,
    check_allowed,
    default_plugin_name,
    parse_source,
    validate_plugin_name,
)
from registry.settings import Settings
from registry.statuses import LIVE, Status, Sync
from registry.sync_state import PluginRecords
from registry.verdicts import Liveness, Recorded, judge
from registry.views import workspace_summary, workspace_view

CREATE_FIELDS = frozenset({"name", "url", "delivery", "plugins", "labels"})
DELIVERY_MODES = ("filesystem", "http")
MAX_DECLARED_PLUGINS = 100
MAX_SOURCE_LENGTH = 2048


def parse_declared_plugins(body: v.Body, sources: SourceSettings) -> list[DeclaredPlugin]:
    """Validate a declared set: known schemes (400), allowlisted sources (403), unique names."""
    declared: list[DeclaredPlugin] = []
    for item in v.array(body, "plugins", max_items=MAX_DECLARED_PLUGINS) or []:
        entry = v.item_object(item, "plugins")
        v.reject_unknown_fields(entry, ("source", "name"))
        raw = v.text(entry, "source", "", max_length=MAX_SOURCE_LENGTH)
        if not raw:
            raise InvalidField("each plugin needs a source", field="plugins")
        try:
            source = parse_source(raw, sources)
            name = validate_plugin_name(
                v.text(entry, "name", "", max_length=64) or default_plugin_name(source)
            )
            check_allowed(source, sources)
        except SourceDenied as exc:
            raise Forbidden(exc.message, field="plugins", code=exc.code) from None
        except PluginError as exc:
            raise InvalidField(exc.message, field="plugins", code=exc.code) from None
        if any(p.name == name for p in declared):
            raise InvalidField(f"plugin name declared twice: {name}", field="plugins")
        # Stored normalised, so a fan-out by source matches however it was spelled.
        declared.append(DeclaredPlugin(name, source.raw))
    return declared


def parse_name(body: v.Body) -> str:
    name = v.text(body, "name", "", max_length=128).strip()
    if not name:
        raise InvalidField("name is required", field="name", code="missing_field")
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    # The CLI takes an id or a name wherever it takes a workspace: they must not look alike.
    raise InvalidField("name must not be a UUID", field="name")


async def post_workspaces(request: web.Request) -> web.Response:
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, CREATE_FIELDS)
    name = parse_name(body)
    labels = parse_labels(body.get("labels"))
    delivery = v.choice(body, "delivery", "filesystem", DELIVERY_MODES)
    url = v.http_url(body, "url")
    plugins = parse_declared_plugins(body, request.app[SOURCES])
    token = new_workspace_token()
    who = actor(request)
    async with request.app[POOL].acquire() as conn:
        try:
            workspace = await workspaces.create_workspace(
                conn,
                name=name,
                token_hash=hash_token(token),
                delivery=delivery,
                url=url,
                plugins=plugins,
                labels=labels,
                actor=who,
            )
        except workspaces.NameTaken as exc:
            raise AlreadyExists(
                f"a workspace named {name!r} exists: {exc.existing_id}",
                workspace_id=exc.existing_id,
            ) from None
        view = await _workspace_view(
            conn, workspace.id, request.app[SETTINGS], request.app[SOURCES]
        )
    audit.log(audit.Entry(who, "created", workspace.id, {"name": name, **_plugins(plugins)}))
    # The only time the token is shown: only its hash is kept.
    return json_response({"workspace": view, "token": token}, status=201)


async def _workspace_view(
    conn: Connection, workspace_id: uuid.UUID, settings: Settings, sources: SourceSettings
) -> dict[str, Any]:
    workspace = await workspaces.get_workspace(conn, workspace_id)
    if workspace is None:
        raise workspace_not_found(workspace_id)
    declared = await workspaces.declared_plugins(conn, workspace_id)
    recorded = Recorded(
        workspace,
        declared=declared,
        installed=await workspaces.installed_plugins(conn, workspace_id),
        last=await reconciles.last_reconcile(conn, workspace_id),
        liveness=Liveness.from_settings(settings),
        pending=await actions.pending_actions(conn, workspace_id),
        status_cause=await events.status_cause(
            conn, workspace_id, workspace.status, workspace.status_changed_at
        ),
        guard=await fleet.read_guard(conn),
        # Read last, after everything it judges (db/clock.py).
        now=await db_now(conn),
        refused_sources=refused_sources(declared, sources),
        allowlist=sources.allowlist,
    )
    return workspace_view(recorded)


def refused_sources(
    declared: list[DeclaredPlugin],
    sources: SourceSettings,
    checked: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Declared plugins the allowlist refuses now: it may have been tightened since they were
    declared (and installed). The same check the install pipeline makes; `checked` keeps the
    answer per source across a page (a file:// check resolves the path on disk)."""
    checked = {} if checked is None else checked
    refused = {}
    for plugin in declared:
        if plugin.source not in checked:
            try:
                check_allowed(parse_source(plugin.source, sources), sources)
                checked[plugin.source] = None
            except PluginError as exc:
                checked[plugin.source] = exc.message
        if (refusal := checked[plugin.source]) is not None:
            refused[plugin.name] = refusal
    return refused


async def workspace_response(request: web.Request, workspace_id: uuid.UUID) -> web.Response:
    async with request.app[POOL].acquire() as conn:
        return json_response(
            await _workspace_view(conn, workspace_id, request.app[SETTINGS], request.app[SOURCES])
        )


async def get_workspace(request: web.Request) -> web.Response:
    return await workspace_response(request, v.path_uuid(request))


MAX_PAGE = 500


# Rows a plugins_sync filter judges per request at most: SQL selects the candidates by the
# stored value (and those changed since it was stored), the verdict decides. A page may then
# come back short (even empty) with a next_cursor: the scan goes on from there, so a client
# pages on while next_cursor is not null.
SYNC_SCAN_BUDGET = 1000


async def get_workspaces(request: web.Request) -> web.Response:
    filters = parse_filters(request)
    after = query.query_uuid(request, "cursor")
    limit = query.query_int(request, "limit", 100, minimum=1, maximum=MAX_PAGE)
    settings, sources = request.app[SETTINGS], request.app[SOURCES]
    shown: list[Recorded] = []
    next_cursor: uuid.UUID | None = None
    scanned = 0
    async with request.app[POOL].acquire() as conn:
        if Sync.OUT_OF_SYNC in filters.syncs:
            filters = dataclasses.replace(
                filters, refused_sources=await _refused_fleet_sources(conn, sources)
            )
        while True:
            chunk = limit + 1
            page = await list_filtered(conn, filters, after=after, limit=chunk)
            recorded = await _recorded_page(conn, page, settings, sources)
            for state in recorded:
                if filters.syncs and judge(state).plugins_sync not in filters.syncs:
                    continue
                shown.append(state)
            scanned += len(page)
            if len(shown) > limit:
                shown = shown[:limit]
                next_cursor = shown[-1].workspace.id
                break
            if len(page) < chunk:
                break  # the end of the fleet
            after = page[-1].id
            if scanned >= SYNC_SCAN_BUDGET:
                next_cursor = after
                break
    return json_response(
        {
            "workspaces": [workspace_summary(state) for state in shown],
            "next_cursor": None if next_cursor is None else str(next_cursor),
        }
    )


async def _refused_fleet_sources(conn: Connection, sources: SourceSettings) -> tuple[str, ...]:
    """The declared sources the allowlist of this process refuses now (the part of
    plugins_sync that is not stored: registry/db/filters.py)."""
    declared = [DeclaredPlugin(source, source) for source in await declared_sources(conn)]
    return tuple(refused_sources(declared, sources))


async def _recorded_page(
    conn: Connection,
    page: list[workspaces.Workspace],
    settings: Settings,
    sources: SourceSettings,
) -> list[Recorded]:
    """The recorded state of a page of workspaces, for their verdicts: one statement per
    table for the whole page, not per workspace."""
    records = await PluginRecords.read(conn, [w.id for w in page])
    causes = await events.status_causes(conn, [(w.id, w.status, w.status_changed_at) for w in page])
    guard = await fleet.read_guard(conn)
    liveness, now = Liveness.from_settings(settings), await db_now(conn)
    checked: dict[str, str | None] = {}
    return [
        records.recorded(
            w,
            liveness,
            now,
            status_cause=causes.get(w.id),
            guard=guard,
            refused_sources=refused_sources(records.declared[w.id], sources, checked),
            allowlist=sources.allowlist,
        )
        for w in page
    ]


async def lock_existing_workspace(conn: Connection, workspace_id: uuid.UUID) -> Status:
    """Lock the workspace row for this transaction: 404 if unknown, 409 if removed."""
    status = await reconciles.lock_workspace_status(conn, workspace_id)
    if status is None:
        raise workspace_not_found(workspace_id)
    if status == Status.REMOVED:
        raise workspace_removed()
    return Status(status)


def _plugins(plugins: list[DeclaredPlugin]) -> dict[str, Any]:
    """A declared set as audit detail."""
    return {"plugins": [{"name": p.name, "source": p.source} for p in plugins]}


async def put_workspace_plugins(request: web.Request) -> web.Response:
    """Replace the declared set; a live workspace is reconciled (removals uninstall)."""
    workspace_id = v.path_uuid(request)
    body = await v.read_json_object(request)
    v.reject_unknown_fields(body, ("plugins",))
    v.required(body, "plugins")
    plugins = parse_declared_plugins(body, request.app[SOURCES])
    queued = False
    entry = audit.Entry(actor(request), "plugins_set", workspace_id, _plugins(plugins))
    async with request.app[POOL].acquire() as conn:
        async with conn.transaction():
            status = await lock_existing_workspace(conn, workspace_id)
            await workspaces.replace_declared(conn, workspace_id, plugins)
            if status in LIVE:
                await reconciles.queue_reconcile(conn, workspace_id, "declared_changed")
                queued = True
            await audit.record(conn, entry)
        view = await _workspace_view(
            conn, workspace_id, request.app[SETTINGS], request.app[SOURCES]
        )
    audit.log(entry)
    if queued:
        request.app[RECONCILER].wake()
    return json_response(view)
