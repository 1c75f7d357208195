"""The audit trail: every operator action writes an event naming the token that made it, in
the transaction of the change (an event that cannot be written undoes the change), and logs
one `registry.audit` line with the same fields once it committed."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse

from tests.hostile_support import state
from tests.support import ADMIN, Registry, Workspace, bearer, write_tree


@dataclass
class Scene:
    registry: Registry
    operator: dict[str, str]  # the `operate` token named "alice"
    admin: dict[str, str]  # the `admin` token named "root-bot"
    workspace: Workspace  # online, declaring plugin p
    paused: Workspace
    source: str


async def scene(registry: Registry, plugin_sources: Path) -> Scene:
    plugin = write_tree(plugin_sources / "p", {"p.py": "print('p')\n"})
    source = f"file://{plugin}"
    secrets = {}
    for name, role in (("alice", "operate"), ("root-bot", "admin")):
        response = await registry.client.post(
            "/tokens", json={"name": name, "role": role}, headers=ADMIN
        )
        secrets[name] = (await response.json())["secret"]
    workspace = await registry.create_workspace([{"source": source, "name": "p"}])
    await registry.set_status(workspace, "online")
    paused = await registry.create_workspace()
    await registry.set_status(paused, "paused")
    await registry.db.execute("UPDATE fleet_guard SET holding = true, since = now()")
    await registry.client.post("/tokens", json={"name": "doomed", "role": "read"}, headers=ADMIN)
    return Scene(registry, bearer(secrets["alice"]), bearer(secrets["root-bot"]), workspace,
                 paused, source)  # fmt: skip


Act = Callable[[Scene], Awaitable[ClientResponse]]


def request(method: str, path: str, body: Any = None, *, admin: bool = False) -> Act:
    async def act(s: Scene) -> ClientResponse:
        target = path.format(ws=s.workspace.id, paused=s.paused.id)
        payload = body(s) if callable(body) else body
        headers = s.admin if admin else s.operator
        return await s.registry.client.request(method, target, json=payload, headers=headers)

    return act


# action (the event's cause), its kind, the request that makes it, its actor.
ACTIONS: list[tuple[str, str, Act, str]] = [
    ("created", "status", request("POST", "/workspaces", {"name": "new", "plugins": []}), "alice"),
    (
        "plugins_set",
        "audit",
        request("PUT", "/workspaces/{ws}/plugins", lambda s: {"plugins": []}),
        "alice",
    ),
    (
        "labels_set",
        "audit",
        request("PATCH", "/workspaces/{ws}/labels", {"labels": {"env": "prod"}}),
        "alice",
    ),
    ("paused", "status", request("POST", "/workspaces/{ws}/pause"), "alice"),
    ("resumed", "status", request("POST", "/workspaces/{paused}/resume"), "alice"),
    ("removed", "status", request("DELETE", "/workspaces/{ws}"), "alice"),
    ("token_rotated", "token", request("POST", "/workspaces/{ws}/token"), "alice"),
    (
        "reconcile_requested",
        "audit",
        request("POST", "/internal/workspaces/{ws}/reconcile", {}),
        "alice",
    ),
    (
        "plugins_reconcile_fanned_out",
        "audit",
        request("POST", "/internal/plugins/reconcile", {"name": "p"}),
        "alice",
    ),
    (
        "api_token_created",
        "audit",
        request("POST", "/tokens", {"name": "new-bot", "role": "read"}, admin=True),
        "root-bot",
    ),
    ("api_token_revoked", "audit", request("DELETE", "/tokens/doomed", admin=True), "root-bot"),
    ("mass_expiry_guard_acknowledged", "audit", request("POST", "/fleet/guard/ack"), "alice"),
]
IDS = [action for action, *_ in ACTIONS]


async def guard_row(db: asyncpg.Connection) -> tuple[Any, ...]:
    row = await db.fetchrow("SELECT holding, acked_at, acked_by FROM fleet_guard")
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize(("action", "kind", "act", "actor"), ACTIONS, ids=IDS)
async def test_every_operator_action_is_an_event_and_a_log_line_naming_the_token(
    registry: Registry,
    plugin_sources: Path,
    caplog: pytest.LogCaptureFixture,
    action: str,
    kind: str,
    act: Act,
    actor: str,
) -> None:
    s = await scene(registry, plugin_sources)
    caplog.set_level(logging.INFO, logger="registry.audit")

    response = await act(s)

    assert response.status < 300, await response.text()
    events = await registry.db.fetch(
        "SELECT kind, actor, workspace_id FROM workspace_events WHERE cause = $1", action
    )
    # The scene's own set-up (workspaces, tokens) was done by the bootstrap admin.
    events = [e for e in events if e["actor"] != "admin"]
    assert [(e["kind"], e["actor"]) for e in events] == [(kind, actor)]
    lines = [r for r in caplog.records if r.name == "registry.audit"]
    assert [(r.__dict__["action"], r.__dict__["actor"]) for r in lines] == [(action, actor)]
    workspace_id = events[0]["workspace_id"]
    assert lines[0].__dict__["workspace_id"] == (
        None if workspace_id is None else str(workspace_id)
    )
    assert lines[0].levelno == logging.INFO


@contextlib.asynccontextmanager
async def events_refused(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Every event insert fails, as a full disk or a broken constraint would make it."""
    await db.execute(
        "CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'event refused (test)'; END $$"
    )
    await db.execute(
        "CREATE TRIGGER refuse_event BEFORE INSERT ON workspace_events "
        "FOR EACH ROW WHEN (NEW.kind <> 'reconcile') EXECUTE FUNCTION refuse_event()"
    )
    try:
        yield
    finally:
        await db.execute("DROP TRIGGER refuse_event ON workspace_events")
        await db.execute("DROP FUNCTION refuse_event()")


@pytest.mark.parametrize(("action", "kind", "act", "actor"), ACTIONS, ids=IDS)
async def test_an_action_whose_event_cannot_be_written_does_not_happen(
    registry: Registry,
    plugin_sources: Path,
    caplog: pytest.LogCaptureFixture,
    action: str,
    kind: str,
    act: Act,
    actor: str,
) -> None:
    s = await scene(registry, plugin_sources)
    caplog.set_level(logging.INFO, logger="registry.audit")
    before = (await state(registry.db), await guard_row(registry.db))

    async with events_refused(registry.db):
        response = await act(s)

    assert response.status == 500, await response.text()
    assert (await state(registry.db), await guard_row(registry.db)) == before
    assert not [r for r in caplog.records if r.name == "registry.audit"]


async def test_a_refused_action_records_nothing(registry: Registry, plugin_sources: Path) -> None:
    s = await scene(registry, plugin_sources)
    before = await registry.db.fetchval("SELECT count(*) FROM workspace_events")

    missing = uuid.uuid4()
    for response in (
        await registry.client.post(f"/workspaces/{missing}/pause", headers=s.operator),
        await registry.client.put(
            f"/workspaces/{missing}/plugins", json={"plugins": []}, headers=s.operator
        ),
        await registry.client.delete("/tokens/nobody", headers=s.admin),
    ):
        assert response.status == 404

    assert await registry.db.fetchval("SELECT count(*) FROM workspace_events") == before
