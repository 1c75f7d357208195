"""The dashboard's sessions in PostgreSQL (kept across restarts, shared by replicas, ended by
logout, expiry and revocation) and the trusted-proxy setting that makes them Secure behind a
TLS-terminating proxy. No browser: the cookie and the headers are what is under test."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from registry.handlers import events as event_handlers
from registry.settings import Settings, SettingsError
from tests.conftest import MakeRegistry
from tests.processes import Processes
from tests.support import ADMIN, ADMIN_TOKEN, AppClient, Registry, bearer
from tests.test_cli import registry_env

COOKIE = "registry_session"


def origin(client: AppClient, scheme: str = "http") -> str:
    return f"{scheme}://{client.host}:{client.port}"


async def new_token(registry: Registry, name: str, role: str = "read") -> str:
    response = await registry.client.post(
        "/tokens", json={"name": name, "role": role}, headers=ADMIN
    )
    assert response.status == 201, await response.text()
    secret: str = (await response.json())["secret"]
    return secret


async def login(
    client: AppClient, token: str, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """(session id, the raw Set-Cookie header)."""
    response = await client.post(
        "/ui/login", json={"token": token}, headers=headers or {"Origin": origin(client)}
    )
    assert response.status == 200, await response.text()
    # Each test names the session it sends: the client's jar keeps none of its own.
    client.session.cookie_jar.clear()
    return response.cookies[COOKIE].value, response.headers["Set-Cookie"]


def with_cookie(session_id: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session_id}", **headers}


async def session_status(client: AppClient, session_id: str) -> tuple[int, Any]:
    response = await client.get("/ui/session", headers=with_cookie(session_id))
    return response.status, await response.json()


async def test_a_session_is_kept_as_a_hash_with_its_role_and_token_reference(
    registry: Registry,
) -> None:
    token = await new_token(registry, "alice")

    session_id, _ = await login(registry.client, token)

    (row,) = await registry.db.fetch("SELECT * FROM ui_sessions")
    token_id = await registry.db.fetchval("SELECT id FROM api_tokens WHERE name = 'alice'")
    assert row["id_hash"] == hashlib.sha256(session_id.encode()).digest()
    assert (row["name"], row["role"], row["token_id"]) == ("alice", "read", token_id)
    assert row["admin_check"] is None
    assert row["expires_at"] > row["created_at"]
    stored = " ".join(str(value) for value in row.values())
    assert session_id not in stored
    assert token not in stored
    assert await session_status(registry.client, session_id) == (
        200,
        {"name": "alice", "role": "read"},
    )


async def test_an_expired_session_is_refused_and_deleted_by_the_next_login(
    registry: Registry,
) -> None:
    token = await new_token(registry, "bob")
    session_id, _ = await login(registry.client, token)
    await registry.db.execute("UPDATE ui_sessions SET expires_at = now() - interval '1 second'")

    status, body = await session_status(registry.client, session_id)

    assert (status, body["error"]["code"]) == (401, "session_ended")
    await login(registry.client, token)
    assert await registry.db.fetchval("SELECT count(*) FROM ui_sessions") == 1  # the new one


async def test_logout_deletes_the_session_row(registry: Registry) -> None:
    session_id, _ = await login(registry.client, await new_token(registry, "carol"))

    response = await registry.client.post(
        "/ui/logout", headers=with_cookie(session_id, Origin=origin(registry.client))
    )

    assert response.status == 204
    assert await registry.db.fetchval("SELECT count(*) FROM ui_sessions") == 0
    assert (await session_status(registry.client, session_id))[0] == 401


async def test_revoking_the_token_deletes_the_sessions_it_opened(registry: Registry) -> None:
    token = await new_token(registry, "dave")
    first, _ = await login(registry.client, token)
    await login(registry.client, token)
    kept, _ = await login(registry.client, await new_token(registry, "erin"))

    response = await registry.client.delete("/tokens/dave", headers=ADMIN)

    assert response.status == 204
    names = [r["name"] for r in await registry.db.fetch("SELECT name FROM ui_sessions")]
    assert names == ["erin"]
    status, body = await session_status(registry.client, first)
    assert (status, body["error"]["code"]) == (401, "session_ended")
    assert (await session_status(registry.client, kept))[0] == 200
    detail = await registry.db.fetchval(
        "SELECT detail FROM workspace_events WHERE cause = 'api_token_revoked'"
    )
    assert '"sessions_ended": 2' in detail


async def test_a_token_expired_since_the_login_ends_its_session(registry: Registry) -> None:
    session_id, _ = await login(registry.client, await new_token(registry, "frank"))
    await registry.db.execute("UPDATE api_tokens SET expires_at = now() WHERE name = 'frank'")

    status, body = await session_status(registry.client, session_id)

    assert (status, body["error"]["code"]) == (401, "session_ended")
    assert await registry.db.fetchval("SELECT count(*) FROM ui_sessions") == 0


async def test_a_bootstrap_admin_session_ends_when_the_admin_token_changes(
    make_registry: Any,
) -> None:
    first = await make_registry()
    session_id, _ = await login(first.client, ADMIN_TOKEN)
    same = await make_registry()
    changed = await make_registry(admin_token="another-admin-token-0123")

    assert await session_status(same.client, session_id) == (
        200,
        {"name": "admin", "role": "admin"},
    )
    status, body = await session_status(changed.client, session_id)
    assert (status, body["error"]["code"]) == (401, "session_ended")


async def test_a_session_survives_a_restart_and_is_honoured_by_a_second_process(
    db: asyncpg.Connection,
    dsn: str,
    tmp_path: Path,
    plugin_sources: Path,
    processes: Processes,
) -> None:
    env = registry_env(plugin_sources)
    for each in ("a", "b"):
        (tmp_path / each).mkdir()
    first = processes.registry(dsn, tmp_path / "a", env=env)
    second = processes.registry(dsn, tmp_path / "b", env=env)
    await first.wait_healthy()
    await second.wait_healthy()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(
            f"{first.url}/tokens", json={"name": "ops", "role": "operate"}, headers=ADMIN
        ) as r:
            token = (await r.json())["secret"]
        async with http.post(f"{first.url}/workspaces", json={"name": "w"}, headers=ADMIN) as r:
            workspace_id = (await r.json())["workspace"]["id"]
        async with http.post(
            f"{first.url}/ui/login", json={"token": token}, headers={"Origin": first.url}
        ) as r:
            assert r.status == 200, await r.text()
            session_id = r.cookies[COOKIE].value

        # The second process, which never saw the login, honours the session, mutations too.
        async with http.post(
            f"{second.url}/workspaces/{workspace_id}/pause",
            headers=with_cookie(session_id, Origin=second.url),
        ) as r:
            assert r.status == 200, await r.text()

        first.stop()
        restarted = processes.registry(dsn, tmp_path / "a", env=env)
        await restarted.wait_healthy()
        async with http.get(f"{restarted.url}/ui/session", headers=with_cookie(session_id)) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"name": "ops", "role": "operate"}
        # And logging out on one ends it on the other.
        async with http.post(
            f"{restarted.url}/ui/logout", headers=with_cookie(session_id, Origin=restarted.url)
        ) as r:
            assert r.status == 204
        async with http.get(f"{second.url}/ui/session", headers=with_cookie(session_id)) as r:
            assert r.status == 401


# --- behind a TLS-terminating proxy ---------------------------------------------------------


def secure(set_cookie: str) -> bool:
    return "secure" in {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}


async def test_x_forwarded_proto_from_a_trusted_proxy_makes_the_cookie_secure_and_the_origin_https(
    make_registry: Any,
) -> None:
    registry = await make_registry(trusted_proxies=("127.0.0.0/8",))
    client = registry.client
    workspace = await registry.create_workspace()
    proxied = {"X-Forwarded-Proto": "https", "Origin": origin(client, "https")}

    session_id, set_cookie = await login(client, ADMIN_TOKEN, proxied)

    assert secure(set_cookie)
    plain_origin = with_cookie(session_id, **{**proxied, "Origin": origin(client)})
    refused = await client.post(f"/workspaces/{workspace.id}/pause", headers=plain_origin)
    assert (refused.status, (await refused.json())["error"]["code"]) == (403, "cross_origin")
    paused = await client.post(
        f"/workspaces/{workspace.id}/pause", headers=with_cookie(session_id, **proxied)
    )
    assert paused.status == 200, await paused.text()


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8",)], ids=["unset", "other-peer"])
async def test_x_forwarded_proto_is_ignored_unless_the_peer_is_a_trusted_proxy(
    make_registry: Any, trusted: tuple[str, ...]
) -> None:
    client = (await make_registry(trusted_proxies=trusted)).client

    spoofed = await client.post(
        "/ui/login",
        json={"token": ADMIN_TOKEN},
        headers={"X-Forwarded-Proto": "https", "Origin": origin(client, "https")},
    )
    _, set_cookie = await login(
        client, ADMIN_TOKEN, {"X-Forwarded-Proto": "https", "Origin": origin(client)}
    )

    assert (spoofed.status, (await spoofed.json())["error"]["code"]) == (403, "cross_origin")
    assert not secure(set_cookie)


def test_trusted_proxies_are_addresses_or_cidr_blocks() -> None:
    settings = Settings.from_env({"REGISTRY_TRUSTED_PROXIES": "10.0.0.0/8, ::1"})
    assert settings.trusted_proxies == ("10.0.0.0/8", "::1")
    assert Settings.from_env({}).trusted_proxies == ()
    with pytest.raises(SettingsError, match=r"'proxy\.example' is not an IP address"):
        Settings.from_env({"REGISTRY_TRUSTED_PROXIES": "10.0.0.1,proxy.example"})


# --- what the fleet view reads ----------------------------------------------------------------


async def test_fleet_counts_by_plugins_sync_match_the_filter_they_click_to(
    registry: Registry, plugin_sources: Path
) -> None:
    (plugin_sources / "p").mkdir()
    (plugin_sources / "p" / "run.py").write_text("print(1)\n")
    await registry.create_workspace()
    await registry.create_workspace(plugins=[{"source": f"file://{plugin_sources}/p", "name": "p"}])

    response = await registry.client.get("/fleet", headers=ADMIN)

    assert response.status == 200
    by_sync = (await response.json())["plugins_sync"]
    assert set(by_sync) == {"synced", "out_of_sync", "reconciling", "failed"}
    assert sum(by_sync.values()) == 2
    for sync, n in by_sync.items():
        listed = await registry.client.get(f"/workspaces?plugins_sync={sync}", headers=ADMIN)
        assert len((await listed.json())["workspaces"]) == n, sync


async def history(registry: Registry, query: str = "") -> Any:
    response = await registry.client.get(f"/fleet/history{query}", headers=ADMIN)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_fleet_history_rebuilds_each_minutes_counts_from_the_status_events(
    registry: Registry,
) -> None:
    created = await registry.create_workspace()
    await registry.heartbeat(created)  # provisioning → online
    workspace_id = uuid.UUID(created.id)
    # As if created 30 minutes ago and online for the last 10.
    await registry.db.execute(
        "UPDATE workspace_events SET at = now() - CASE to_status"
        " WHEN 'provisioning' THEN interval '30 minutes' ELSE interval '10 minutes' END"
        " WHERE workspace_id = $1 AND kind = 'status'",
        workspace_id,
    )

    body = await history(registry)

    points = body["points"]
    assert body["bucket_s"] == 60
    assert len(points) == 61  # an hour a minute apart, then now
    assert list(points[0]["statuses"]) == [
        "provisioning",
        "online",
        "degraded",
        "offline",
        "failed",
        "paused",
    ]
    ago = {60 - i: p["statuses"] for i, p in enumerate(points)}  # minutes ago → counts
    for minutes in (60, 45, 31):
        assert set(ago[minutes].values()) == {0}, minutes
    for minutes in (29, 20, 11):
        assert (ago[minutes]["provisioning"], ago[minutes]["online"]) == (1, 0), minutes
    for minutes in (9, 1, 0):
        assert (ago[minutes]["provisioning"], ago[minutes]["online"]) == (0, 1), minutes
    assert points[0]["at"] < points[-1]["at"]
    assert len((await history(registry, "?minutes=5"))["points"]) == 6


async def test_fleet_history_is_read_once_for_every_dashboard_within_the_cache_period(
    registry: Registry,
) -> None:
    first = await history(registry)
    await registry.create_workspace()  # a status event the cached figures do not have yet

    again = await history(registry)

    assert again == first
    assert first["points"][-1]["statuses"]["provisioning"] == 0


@pytest.mark.parametrize("minutes", ["0", "61", "ten", "1.5"])
async def test_fleet_history_refuses_a_window_it_does_not_keep(
    registry: Registry, minutes: str
) -> None:
    response = await registry.client.get(f"/fleet/history?minutes={minutes}", headers=ADMIN)

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "minutes"


async def test_a_read_token_may_read_the_fleet_history(registry: Registry) -> None:
    token = await new_token(registry, "viewer")
    response = await registry.client.get("/fleet/history", headers=bearer(token))
    assert response.status == 200


async def read_until_unauthorized(stream: aiohttp.ClientResponse, within_s: float = 20.0) -> Any:
    """The data of the stream's `event: unauthorized` frame; the stream must end after it."""
    async with asyncio.timeout(within_s):
        while (line := await stream.content.readline()) != b"event: unauthorized\n":
            assert line, "the stream ended without an unauthorized frame"
        data = orjson.loads((await stream.content.readline()).removeprefix(b"data: "))
        assert await stream.content.readline() == b"\n"
        assert await stream.content.read() == b""  # and nothing after it
    return data


@pytest.mark.parametrize("direct_writes", [True, False], ids=["direct", "writer-task"])
@pytest.mark.parametrize("opened_with", ["bearer", "session"])
async def test_an_open_event_stream_ends_once_its_token_is_revoked(
    make_registry: MakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    direct_writes: bool,
    opened_with: str,
) -> None:
    # Re-asked at every keep-alive tick, so the test waits ticks, not a minute.
    monkeypatch.setattr(event_handlers, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(event_handlers, "AUTH_RECHECK_S", 0.05)
    registry = await make_registry(event_direct_writes=direct_writes)
    token = await new_token(registry, "grace")
    if opened_with == "bearer":
        headers = bearer(token)
    else:
        session_id, _ = await login(registry.client, token)
        headers = with_cookie(session_id)
    stream = await registry.client.get("/events", headers=headers)
    assert stream.status == 200, await stream.text()
    assert await stream.content.readline() == b"retry: 1000\n"
    staying = await registry.client.get("/events", headers=ADMIN)

    revoked = await registry.client.delete("/tokens/grace", headers=ADMIN)

    assert revoked.status == 204
    data = await read_until_unauthorized(stream)
    expected = "token_revoked" if opened_with == "bearer" else "session_ended"
    assert data["code"] == expected
    again = await registry.client.get("/events", headers=headers)
    assert again.status == 401
    # The other stream goes on.
    await registry.create_workspace()
    async with asyncio.timeout(20.0):
        while not (await staying.content.readline()).startswith(b"event: "):
            pass
    staying.close()
    stream.close()
