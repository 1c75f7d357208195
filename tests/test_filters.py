"""Names, labels and the `GET /workspaces` filters, against a real PostgreSQL fleet.

The fleet is put in each state by SQL (a failed run, a queued one an hour away, a pending
restart, a refusal), so nothing waits on the reconciler or a clock.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from registry import sync_state
from registry.db.migrate import load_migrations, migrate
from registry.labels import MAX_LABELS
from registry.query import ALLOWED_PARAMETERS, RUNTIME_ROUTES
from tests.support import ADMIN, Registry, Workspace


@dataclass
class Fleet:
    by_name: dict[str, Workspace]

    def ids(self, *names: str) -> set[str]:
        return {self.by_name[n].id for n in names}


async def _create(registry: Registry, name: str, labels: dict[str, str]) -> Workspace:
    return await registry.create_workspace(name=name, labels=labels)


@pytest.fixture
async def fleet(registry: Registry) -> Fleet:
    spec: dict[str, dict[str, str]] = {
        "web-1": {"env": "prod", "tier": "web", "team": "x"},
        "web-2": {"env": "prod", "tier": "canary"},
        "db-1": {"env": "staging", "legacy": ""},
        "db-2": {},
        "api-1": {"env": "dev", "example.com/owner": "ops"},
        "web-old": {"env": "prod"},
        "api-2": {"env": "prod", "team": "y"},
        "api-3": {"env": "staging"},
    }
    made = {name: await _create(registry, name, labels) for name, labels in spec.items()}
    db = registry.db
    for name in ("web-1", "web-2", "api-1", "api-3"):
        await registry.set_status(made[name], "online")
    # One row at a time: several in one UPDATE are locked in heap order, against the app's
    # plugins_sync refresher locking in id order (a deadlock).
    for workspace in made.values():
        await db.execute(
            "UPDATE workspaces SET last_heartbeat_at = now() WHERE id = $1",
            uuid.UUID(workspace.id),
        )
    await registry.set_status(made["db-1"], "paused")
    await registry.set_status(made["db-2"], "offline")
    await registry.set_status(made["web-old"], "removed")
    # db-2: its latest run failed. An older success first, to check "latest".
    await db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at, error) "
        "VALUES ($1, 'manual', 'succeeded', now() - interval '2 hours', now(), NULL), "
        "       ($1, 'manual', 'failed', now() - interval '1 hour', now(), 'boom')",
        uuid.UUID(made["db-2"].id),
    )
    # api-1 failed once, then succeeded: not a failed reconcile any more.
    await db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at, error) "
        "VALUES ($1, 'manual', 'failed', now() - interval '2 hours', now(), 'old'), "
        "       ($1, 'manual', 'succeeded', now() - interval '1 hour', now(), NULL)",
        uuid.UUID(made["api-1"].id),
    )
    # api-1 has a restart it was asked for and has not acknowledged.
    await db.execute(
        "INSERT INTO workspace_actions (workspace_id, type, reason) VALUES ($1, 'restart', 't')",
        uuid.UUID(made["api-1"].id),
    )
    # api-3: a run queued an hour from now (the worker leaves it).
    await db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'manual', now() + interval '1 hour')",
        uuid.UUID(made["api-3"].id),
    )
    # api-2: its runtime's beats are refused since its last accepted one.
    await db.execute(
        "UPDATE workspaces SET refused_at = now(), refused_since = now(), refused_count = 3, "
        "refused_status = 400, refused_code = 'invalid_field', refused_field = 'error_rate' "
        "WHERE id = $1",
        uuid.UUID(made["api-2"].id),
    )
    return Fleet(made)


async def _list(registry: Registry, query: str) -> list[dict[str, Any]]:
    """Every page of the filtered list, walked with the cursor two at a time."""
    found: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(50):
        response = await registry.client.get(f"/workspaces?{query}&limit=2{cursor}", headers=ADMIN)
        assert response.status == 200, await response.text()
        body = await response.json()
        found.extend(body["workspaces"])
        if body["next_cursor"] is None:
            return found
        cursor = f"&cursor={body['next_cursor']}"
    raise AssertionError("the pages never ended")


async def _names(registry: Registry, query: str) -> set[str]:
    return {w["name"] for w in await _list(registry, query)}


LIVE = {"web-1", "web-2", "db-1", "db-2", "api-1", "api-2", "api-3"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("include_removed=false", LIVE),
        ("include_removed=true", LIVE | {"web-old"}),
        ("status=online", {"web-1", "web-2", "api-1", "api-3"}),
        ("status=paused,offline", {"db-1", "db-2"}),
        ("status=paused&status=provisioning", {"db-1", "api-2"}),
        ("status=removed", {"web-old"}),
        ("status=online,removed", {"web-1", "web-2", "api-1", "api-3", "web-old"}),
        ("selector=env=prod", {"web-1", "web-2", "api-2"}),
        ("selector=env==prod", {"web-1", "web-2", "api-2"}),
        ("selector=env=prod&include_removed=true", {"web-1", "web-2", "api-2", "web-old"}),
        ("selector=env=prod,tier!=canary", {"web-1", "api-2"}),
        ("selector=tier!=canary", LIVE - {"web-2"}),
        ("selector=team", {"web-1", "api-2"}),
        ("selector=!env", {"db-2"}),
        ("selector=env,!team", {"web-2", "db-1", "api-1", "api-3"}),
        ("selector=legacy=", {"db-1"}),
        ("selector=env in (staging, dev)", {"db-1", "api-1", "api-3"}),
        ("selector=env notin (prod,staging)", {"db-2", "api-1"}),
        ("selector=env in (prod,staging),env in (staging,dev)", {"db-1", "api-3"}),
        ("selector=example.com/owner=ops", {"api-1"}),
        ("name_prefix=web", {"web-1", "web-2"}),
        ("name_prefix=web&include_removed=true", {"web-1", "web-2", "web-old"}),
        ("name_prefix=api-", {"api-1", "api-2", "api-3"}),
        ("name_prefix=a%25", set()),  # a literal %, not a wildcard
        ("name_prefix=zzz", set()),
        ("has=refusal", {"api-2"}),
        ("has=pending_restart", {"api-1"}),
        ("has=failed_reconcile", {"db-2"}),
        ("has=refusal,pending_restart", set()),  # several: all of them hold
        ("plugins_sync=failed", {"db-2"}),
        ("plugins_sync=reconciling", {"api-3"}),
        ("plugins_sync=out_of_sync", {"api-1"}),
        ("plugins_sync=synced", {"web-1", "web-2", "db-1", "api-2"}),
        ("plugins_sync=failed,reconciling", {"db-2", "api-3"}),
        # Combinations: every filter holds.
        ("status=online&selector=env=prod", {"web-1", "web-2"}),
        ("status=online&name_prefix=api&plugins_sync=synced", set()),
        ("status=online,provisioning&selector=team&name_prefix=api", {"api-2"}),
        ("selector=env=staging&plugins_sync=reconciling&status=online", {"api-3"}),
        ("has=pending_restart&plugins_sync=out_of_sync&selector=env=dev", {"api-1"}),
        ("has=failed_reconcile&status=online", set()),
    ],
)
async def test_filters_select_exactly_their_workspaces_across_pages(
    registry: Registry, fleet: Fleet, query: str, expected: set[str]
) -> None:
    listed = await _list(registry, query)
    assert {w["name"] for w in listed} == expected
    assert len(listed) == len(expected), "a workspace was listed twice across pages"
    ids = [w["id"] for w in listed]
    assert ids == sorted(ids, key=uuid.UUID), "pages are in id order"


async def test_each_listed_workspace_carries_labels_plugins_sync_and_its_why(
    registry: Registry, fleet: Fleet
) -> None:
    listed = {w["name"]: w for w in await _list(registry, "include_removed=true")}
    assert listed["web-1"]["labels"] == {"env": "prod", "tier": "web", "team": "x"}
    assert listed["db-2"]["plugins_sync"] == "failed"
    assert "boom" in listed["db-2"]["why"]
    assert "\n" not in listed["db-2"]["why"]
    assert listed["web-1"]["why"] is None
    # The list tells the same story as the full view of each workspace (read a moment
    # later: "N s ago" may have moved on).
    for name, summary in listed.items():
        shown = await registry.show(fleet.by_name[name])
        for key in ("plugins_sync", "ready", "usable", "labels"):
            assert summary[key] == shown[key], (name, key)
        assert _timeless(summary["why"]) == _timeless(shown["why"]), name


def _timeless(why: str | None) -> str | None:
    return None if why is None else re.sub(r"[0-9]+", "N", why)


async def test_plugins_sync_filters_partition_the_fleet_as_the_verdicts_do(
    registry: Registry, fleet: Fleet
) -> None:
    everyone = {w["id"]: w["plugins_sync"] for w in await _list(registry, "include_removed=false")}
    seen: dict[str, str] = {}
    for sync in ("synced", "out_of_sync", "reconciling", "failed"):
        for w in await _list(registry, f"plugins_sync={sync}"):
            assert w["id"] not in seen, "in two sync states"
            assert w["plugins_sync"] == sync
            seen[w["id"]] = sync
    assert seen == everyone


async def test_a_sync_filter_pages_on_when_its_scan_budget_runs_out(
    registry: Registry, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.handlers import workspaces as handler

    monkeypatch.setattr(handler, "SYNC_SCAN_BUDGET", 1)
    pages = 0
    cursor = ""
    found = []
    # Every workspace changed since its value was stored (marked, and the refresher held off):
    # each one is a candidate the handler judges.
    db = registry.db
    await db.execute("SELECT pg_advisory_lock($1)", sync_state.REFRESH_LOCK_KEY)
    try:
        await db.execute("INSERT INTO plugins_sync_dirty SELECT id FROM workspaces")
        while True:
            response = await registry.client.get(
                f"/workspaces?plugins_sync=failed&limit=5{cursor}", headers=ADMIN
            )
            body = await response.json()
            pages += 1
            found += [w["name"] for w in body["workspaces"]]
            if body["next_cursor"] is None:
                break
            cursor = f"&cursor={body['next_cursor']}"
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", sync_state.REFRESH_LOCK_KEY)
    assert found == ["db-2"]
    assert pages > 1, "a short page with a cursor, not a scan of the whole fleet"


# --- names ---------------------------------------------------------------------------------


async def test_creating_an_existing_name_is_409_with_the_existing_id(registry: Registry) -> None:
    first = await registry.create_workspace(name="prov-1")
    response = await registry.client.post("/workspaces", json={"name": "prov-1"}, headers=ADMIN)
    assert response.status == 409
    error = (await response.json())["error"]
    assert error["code"] == "already_exists"
    assert error["field"] == "name"
    assert error["workspace_id"] == first.id
    assert await registry.db.fetchval("SELECT count(*) FROM workspaces") == 1


async def test_concurrent_creates_of_one_name_make_one_workspace_and_409s_naming_it(
    registry: Registry,
) -> None:
    responses = await asyncio.gather(
        *(
            registry.client.post("/workspaces", json={"name": "racer"}, headers=ADMIN)
            for _ in range(12)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 11
    bodies = [await r.json() for r in responses]
    winner = next(b["workspace"]["id"] for b in bodies if "workspace" in b)
    assert {b["error"]["workspace_id"] for b in bodies if "error" in b} == {winner}
    assert await registry.db.fetchval("SELECT count(*) FROM workspaces") == 1


async def test_a_removed_workspace_frees_its_name(registry: Registry) -> None:
    old = await registry.create_workspace(name="reused")
    assert (await registry.client.delete(f"/workspaces/{old.id}", headers=ADMIN)).status == 204
    new = await registry.create_workspace(name="reused")
    response = await registry.client.get("/workspaces/by-name/reused", headers=ADMIN)
    assert response.status == 200
    assert (await response.json())["id"] == new.id
    # The tombstone is still there under its own id, name and all.
    assert (await registry.show(old))["name"] == "reused"


async def test_by_name_finds_the_live_workspace_or_404s(registry: Registry) -> None:
    made = await registry.create_workspace(name="has {braces} space/and slash", labels={"a": "b"})
    response = await registry.client.get(
        "/workspaces/by-name/has%20%7Bbraces%7D%20space%2Fand%20slash", headers=ADMIN
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["id"], body["labels"]) == (made.id, {"a": "b"})
    for nobody in ("nobody", "nul%00byte", "x" * 129):
        response = await registry.client.get(f"/workspaces/by-name/{nobody}", headers=ADMIN)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "workspace_not_found"


async def test_a_name_shaped_like_a_uuid_is_refused(registry: Registry) -> None:
    response = await registry.client.post(
        "/workspaces", json={"name": str(uuid.uuid4())}, headers=ADMIN
    )
    assert response.status == 400
    assert (await response.json())["error"]["field"] == "name"


async def test_migration_renames_later_duplicates_deterministically(empty_dsn: str) -> None:
    import asyncpg

    before = [m for m in load_migrations() if m.version < 12]
    await migrate(empty_dsn, before)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(
            "INSERT INTO workspaces (id, name, token_hash, created_at, status) VALUES "
            "('00000000-0000-0000-0000-000000000003', 'dup', 'a', now() - interval '3 h', "
            " 'provisioning'),"
            "('00000000-0000-0000-0000-000000000001', 'dup', 'b', now() - interval '1 h', "
            " 'provisioning'),"
            "('00000000-0000-0000-0000-000000000002', 'dup', 'c', now() - interval '1 h', "
            " 'provisioning'),"
            "('00000000-0000-0000-0000-000000000004', 'dup', 'd', now() - interval '9 h', "
            " 'provisioning')"
        )
        await conn.execute(
            "UPDATE workspaces SET status = 'removed' "
            "WHERE id = '00000000-0000-0000-0000-000000000004'"
        )
        await migrate(empty_dsn)
        rows = await conn.fetch("SELECT id::text, name FROM all_workspaces ORDER BY id")
    finally:
        await conn.close()
    names = {r["id"][-1]: r["name"] for r in rows}
    assert names == {
        "1": "dup-duplicate-00000000-0000-0000-0000-000000000001",
        "2": "dup-duplicate-00000000-0000-0000-0000-000000000002",
        "3": "dup",  # the oldest live one keeps it
        "4": "dup",  # a tombstone keeps its name and does not count
    }


# --- labels --------------------------------------------------------------------------------


async def _labels(registry: Registry, workspace: Workspace) -> dict[str, str]:
    labels: dict[str, str] = (await registry.show(workspace))["labels"]
    return labels


async def test_labels_patch_merges_and_null_removes_put_replaces(registry: Registry) -> None:
    made = await registry.create_workspace(labels={"env": "prod", "tier": "web"})
    response = await registry.client.patch(
        f"/workspaces/{made.id}/labels",
        json={"labels": {"tier": None, "team": "a", "env": "staging"}},
        headers=ADMIN,
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["labels"] == {"env": "staging", "team": "a"}
    response = await registry.client.put(
        f"/workspaces/{made.id}/labels", json={"labels": {"only": "this"}}, headers=ADMIN
    )
    assert response.status == 200
    assert await _labels(registry, made) == {"only": "this"}


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        ({"a" * 64: "v"}, "name"),
        ({"Bad_": "v"}, "name"),
        ({"-x": "v"}, "name"),
        ({"": "v"}, "name"),
        ({"/x": "v"}, "prefix"),
        ({"Example.com/x": "v"}, "prefix"),
        ({("a" * 63 + ".") * 4 + "b/x": "v"}, "prefix"),
        ({"k": "a" * 64}, "value"),
        ({"k": "has space"}, "value"),
        ({"k": 5}, "string"),
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, "at most"),
    ],
)
async def test_label_syntax_and_limits_are_kubernetes(
    registry: Registry, labels: dict[str, Any], why: str
) -> None:
    response = await registry.client.post(
        "/workspaces", json={"name": "l", "labels": labels}, headers=ADMIN
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "labels"
    assert why in error["message"]


async def test_labels_at_the_limits_are_accepted(registry: Registry) -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS - 1)}
    labels["a.b-c.example/" + "n" * 63] = "v" * 63
    made = await registry.create_workspace(labels=labels)
    assert await _labels(registry, made) == labels


async def test_a_patch_past_the_cap_is_refused_and_changes_nothing(registry: Registry) -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    made = await registry.create_workspace(labels=labels)
    response = await registry.client.patch(
        f"/workspaces/{made.id}/labels", json={"labels": {"one-more": "v"}}, headers=ADMIN
    )
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "too_many_labels"
    assert await _labels(registry, made) == labels
    # Removing one and adding one in the same patch fits.
    response = await registry.client.patch(
        f"/workspaces/{made.id}/labels",
        json={"labels": {"k0": None, "one-more": "v"}},
        headers=ADMIN,
    )
    assert response.status == 200


async def test_labels_of_a_removed_or_unknown_workspace(registry: Registry) -> None:
    made = await registry.create_workspace()
    await registry.set_status(made, "removed")
    for target, status in [(made.id, 409), (str(uuid.uuid4()), 404)]:
        for method in ("PATCH", "PUT"):
            response = await registry.client.request(
                method, f"/workspaces/{target}/labels", json={"labels": {}}, headers=ADMIN
            )
            assert response.status == status, (method, target)


# --- strict parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "fragment"),
    [
        ("env==", None),
        ("a b", "expected"),
        ("env=prod,", "empty term"),
        (",", "empty term"),
        ("env in (a", "expected"),
        ("!", "invalid key"),
        ("x=y=z", "one operator"),
        ("env=prod,env=dev", "two values"),
        ("Bad_=x", "invalid key"),
        ("env=has space", "value"),
    ],
)
async def test_selector_errors_are_400_naming_the_selector(
    registry: Registry, selector: str, fragment: str | None
) -> None:
    response = await registry.client.get(
        "/workspaces", params={"selector": selector}, headers=ADMIN
    )
    if selector == "env==":
        # `env==` is env equal to the empty value, which is a valid label value.
        assert response.status == 200
        return
    assert response.status == 400, selector
    error = (await response.json())["error"]
    assert error["field"] == "selector"
    assert fragment is not None and fragment in error["message"]


UNKNOWN_ID = "3f8e0c1a-5b7d-4e2f-9a6c-1d2b3c4e5f60"  # no workspace has it


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/workspaces?name=x", "name"),
        ("/workspaces?plugin_sync=failed", "plugin_sync"),
        ("/workspaces?status=", "status"),
        ("/workspaces?status=online,", "status"),
        ("/workspaces?status=asleep", "status"),
        ("/workspaces?plugins_sync=", "plugins_sync"),
        ("/workspaces?plugins_sync=maybe", "plugins_sync"),
        ("/workspaces?has=everything", "has"),
        ("/workspaces?selector=", "selector"),
        ("/workspaces?name_prefix=", "name_prefix"),
        ("/fleet?verbose=1", "verbose"),
        ("/events?workspace=x", "workspace"),
        ("/healthz?x=1", "x"),
        ("/metrics?format=json", "format"),
        # Fixed ids, not uuid4() at collection: pytest-xdist's workers must collect the same ids.
        (f"/workspaces/{UNKNOWN_ID}?x=", "x"),
        (f"/internal/workspaces/{UNKNOWN_ID}/reconciles?limit=1&page=2", "page"),
        (f"/workspaces/{UNKNOWN_ID}/events?since=1", "since"),
    ],
)
async def test_unknown_and_empty_query_parameters_are_400_naming_them(
    registry: Registry, path: str, field: str
) -> None:
    response = await registry.client.get(path, headers=ADMIN)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["field"] == field
    assert field in error["message"]


async def test_mutations_refuse_unknown_query_parameters_too(registry: Registry) -> None:
    made = await registry.create_workspace()
    for method, path in [
        ("POST", "/workspaces?dry_run=true"),
        ("POST", f"/workspaces/{made.id}/pause?force=1"),
        ("DELETE", f"/workspaces/{made.id}?cascade=1"),
        ("PATCH", f"/workspaces/{made.id}/labels?merge=1"),
    ]:
        response = await registry.client.request(
            method, path, json={"name": "q", "labels": {}}, headers=ADMIN
        )
        assert response.status == 400, (method, path)
        assert (await response.json())["error"]["code"] == "unknown_parameter"
    assert (await registry.show(made))["status"] == "provisioning", "nothing was done"


async def test_runtime_routes_ignore_unknown_query_parameters_and_report_them(
    registry: Registry,
) -> None:
    made = await registry.create_workspace()
    response = await registry.client.post(
        "/registry/heartbeat?schema=2&debug=",
        json={"workspace_id": made.id, "colour": "red"},
        headers=made.auth,
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["ignored_fields"] == ["colour", "?debug", "?schema"]
    response = await registry.client.post(
        "/registry/register?v=1", json={"workspace_id": made.id}, headers=made.auth
    )
    assert response.status == 200
    assert (await response.json())["ignored_fields"] == ["?v"]


def test_every_route_has_a_row_in_the_parameter_table(registry: Registry) -> None:
    names = {
        route.name
        for route in registry.client.app.router.routes()
        if route.name is not None and route.method != "HEAD"
    }
    assert names - RUNTIME_ROUTES == set(ALLOWED_PARAMETERS)


async def test_heartbeats_stay_hot_updates_with_the_name_and_label_indexes(
    registry: Registry, dsn: str
) -> None:
    """Heartbeats touch no indexed column (names, labels, refusals are indexed now): each one
    is a HOT update, with no index maintenance."""
    import asyncpg

    from registry.db.heartbeats import apply_beat
    from registry.db.pool import init_connection
    from tests.support import beat

    made = await registry.create_workspace(name="hot", labels={"env": "prod"})
    await registry.set_status(made, "online")
    token_hash = await registry.db.fetchval(
        "SELECT token_hash FROM workspaces WHERE id = $1", uuid.UUID(made.id)
    )
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        async with conn.transaction():
            for _ in range(5):
                await apply_beat(conn, beat(uuid.UUID(made.id), token_hash))
            counts = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                "WHERE relname = 'workspaces'"
            )
    finally:
        await conn.close()
    assert counts is not None
    assert (counts["n_tup_upd"], counts["n_tup_hot_upd"]) == (5, 5)


async def test_concurrent_label_merges_never_pass_the_cap_together(registry: Registry) -> None:
    """Each merge is computed on the row as the other left it (one UPDATE, the row lock), so
    of two merges that each fit alone, the second sees the first's labels and is refused."""
    labels = {f"k{i}": "v" for i in range(MAX_LABELS - 2)}
    made = await registry.create_workspace(labels=labels)
    responses = await asyncio.gather(
        *(
            registry.client.patch(
                f"/workspaces/{made.id}/labels",
                json={"labels": {f"{side}1": "v", f"{side}2": "v"}},
                headers=ADMIN,
            )
            for side in ("a", "b")
        )
    )
    assert sorted(r.status for r in responses) == [200, 409]
    assert len(await _labels(registry, made)) == MAX_LABELS


async def test_name_prefixes_are_compared_by_character_not_collation(registry: Registry) -> None:
    for name in ("été-1", "été-2", "étè", "ete", "f\U0010ffff-x", "f\U0010ffff", "g"):
        await registry.create_workspace(name=name)
    assert await _names(registry, "name_prefix=%C3%A9t%C3%A9") == {"été-1", "été-2"}
    assert await _names(registry, "name_prefix=f%F4%8F%BF%BF") == {"f\U0010ffff-x", "f\U0010ffff"}
    assert await _names(registry, "name_prefix=_") == set()
