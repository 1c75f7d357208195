"""Named API tokens through the HTTP API: shown once, stored hashed, listed without secrets,
revoked and expired at once, names unique among live tokens, strict input."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from registry.auth import hash_token
from tests.hostile_support import assert_error
from tests.support import ADMIN, Registry, bearer


async def make_token(registry: Registry, name: str, role: str, **fields: Any) -> dict[str, Any]:
    response = await registry.client.post(
        "/tokens", json={"name": name, "role": role, **fields}, headers=ADMIN
    )
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def test_a_created_token_is_shown_once_and_kept_only_as_its_hash(
    registry: Registry,
) -> None:
    created = await make_token(registry, "deploy-bot", "operate")

    secret = created["secret"]
    assert secret.startswith("rat_")
    assert created["token"]["name"] == "deploy-bot"
    assert created["token"]["role"] == "operate"
    assert created["token"]["created_by"] == "admin"
    row = await registry.db.fetchrow("SELECT lookup, token_hash FROM api_tokens")
    assert row is not None
    assert bytes(row["token_hash"]) == hash_token(secret)
    assert secret.startswith(f"rat_{row['lookup']}_")
    listed = await registry.client.get("/tokens", headers=ADMIN)
    text = await listed.text()
    assert secret not in text
    assert secret.split("_", 2)[2] not in text
    assert hash_token(secret).hex() not in text
    assert [t["name"] for t in (await listed.json())["tokens"]] == ["deploy-bot"]


async def test_a_token_acts_with_its_role(registry: Registry) -> None:
    reader = bearer((await make_token(registry, "dashboards", "read"))["secret"])
    operator = bearer((await make_token(registry, "oncall", "operate"))["secret"])
    workspace = await registry.create_workspace()

    read = await registry.client.get(f"/workspaces/{workspace.id}", headers=reader)
    refused = await registry.client.post(f"/workspaces/{workspace.id}/pause", headers=reader)
    paused = await registry.client.post(f"/workspaces/{workspace.id}/pause", headers=operator)
    no_tokens = await registry.client.post(
        "/tokens", json={"name": "escalate", "role": "admin"}, headers=operator
    )

    assert read.status == 200
    error = await assert_error(refused, 403, "role_required")
    assert "needs the operate role" in error["message"]
    assert paused.status == 200
    error = await assert_error(no_tokens, 403, "role_required")
    assert "needs the admin role" in error["message"]
    assert await registry.db.fetchval("SELECT count(*) FROM api_tokens") == 2


async def test_a_revoked_token_stops_at_once_and_frees_its_name(registry: Registry) -> None:
    first = await make_token(registry, "ci", "read")

    revoked = await registry.client.delete("/tokens/ci", headers=ADMIN)
    after = await registry.client.get("/workspaces", headers=bearer(first["secret"]))
    again = await registry.client.delete("/tokens/ci", headers=ADMIN)
    second = await make_token(registry, "ci", "operate")
    by_id = await registry.client.delete(f"/tokens/{second['token']['id']}", headers=ADMIN)

    assert revoked.status == 204
    await assert_error(after, 401, "token_revoked")
    assert again.status == 204  # a no-op, as removing a removed workspace is
    revocations = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE cause = 'api_token_revoked'"
    )
    assert revocations == 2  # the first revocation of each "ci", not the repeated one
    assert by_id.status == 204
    listed = await registry.client.get("/tokens?include_revoked=true", headers=ADMIN)
    tokens = (await listed.json())["tokens"]
    assert [(t["name"], t["revoked_by"]) for t in tokens] == [("ci", "admin"), ("ci", "admin")]
    live = await registry.client.get("/tokens", headers=ADMIN)
    assert (await live.json())["tokens"] == []


async def test_an_expired_token_is_refused(registry: Registry) -> None:
    created = await make_token(registry, "temp", "read", expires_at="2999-01-01T00:00:00Z")
    assert created["token"]["expires_at"].startswith("2999-01-01")
    # Time moves in the database, not by waiting.
    await registry.db.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = 'temp'"
    )

    response = await registry.client.get("/workspaces", headers=bearer(created["secret"]))

    await assert_error(response, 401, "token_expired")


async def test_a_live_name_cannot_be_taken_twice(registry: Registry) -> None:
    await make_token(registry, "twice", "read")

    response = await registry.client.post(
        "/tokens", json={"name": "twice", "role": "admin"}, headers=ADMIN
    )

    await assert_error(response, 409, "already_exists")
    assert await registry.db.fetchval("SELECT count(*) FROM api_tokens") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "read"}, "name"),
        ({"name": "", "role": "read"}, "name"),
        ({"name": "Upper", "role": "read"}, "name"),
        ({"name": "a" * 64, "role": "read"}, "name"),
        ({"name": "admin", "role": "read"}, "name"),
        ({"name": "reconciler", "role": "read"}, "name"),
        ({"name": "0123e456-89ab-4def-8123-456789abcdef", "role": "read"}, "name"),
        ({"name": "0123456789abcdef0123456789abcdef", "role": "read"}, "name"),
        ({"name": "ok"}, "role"),
        ({"name": "ok", "role": "root"}, "role"),
        ({"name": "ok", "role": "read", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "ok", "role": "read", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),
        ({"name": "ok", "role": "read", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "ok", "role": "read", "expires_at": 5}, "expires_at"),
        ({"name": "ok", "role": "read", "expires_at": ""}, "expires_at"),
        ({"name": "ok", "role": "read", "scopes": ["x"]}, "scopes"),
    ],
)
async def test_bad_token_requests_are_400_naming_the_field(
    registry: Registry, body: dict[str, Any], field: str
) -> None:
    response = await registry.client.post("/tokens", json=body, headers=ADMIN)

    await assert_error(response, 400, None, field)
    assert await registry.db.fetchval("SELECT count(*) FROM api_tokens") == 0


async def test_revoking_an_unknown_token_is_404(registry: Registry) -> None:
    # A NUL byte (found by tests/test_fuzz.py: it was a 500) names no token either.
    for ref in ("nobody", str(uuid.uuid4()), "%00", "Not%20A%20Name"):
        response = await registry.client.delete(f"/tokens/{ref}", headers=ADMIN)
        await assert_error(response, 404, "token_not_found")


async def test_concurrent_creates_of_one_name_make_one_token(registry: Registry) -> None:
    # The partial unique index decides, not a check before the insert: whatever the
    # interleaving, one create wins and the others are told the name is taken.
    responses = await asyncio.gather(
        *(
            registry.client.post("/tokens", json={"name": "race", "role": "read"}, headers=ADMIN)
            for _ in range(8)
        )
    )

    assert sorted(r.status for r in responses) == [201] + [409] * 7
    assert await registry.db.fetchval("SELECT count(*) FROM api_tokens") == 1
    created = await registry.db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE cause = 'api_token_created'"
    )
    assert created == 1  # the refused ones rolled their events back
