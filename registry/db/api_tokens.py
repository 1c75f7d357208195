"""Named API tokens: created, found by their lookup handle, listed and revoked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from registry.db import Connection


@dataclass(frozen=True, slots=True)
class FoundToken:
    """What authentication needs of a token; `token_hash` is compared by the caller."""

    name: str
    role: str
    token_hash: bytes
    revoked: bool
    expired: bool


# The lookup is unique across every token ever issued (revoked ones included), so a probe
# finds one row or none.
SELECT_BY_LOOKUP = """
SELECT name, role, token_hash,
       revoked_at IS NOT NULL AS revoked,
       expires_at IS NOT NULL AND expires_at <= now() AS expired
FROM api_tokens WHERE lookup = $1
"""


async def find_by_lookup(conn: Connection, lookup: str) -> FoundToken | None:
    row = await conn.fetchrow(SELECT_BY_LOOKUP, lookup)
    return None if row is None else FoundToken(**dict(row))


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A token as it is shown: never its secret, never its hash."""

    id: uuid.UUID
    name: str
    role: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None


TOKEN_COLUMNS = "id, name, role, created_at, created_by, expires_at, revoked_at, revoked_by"

INSERT_TOKEN = f"""
INSERT INTO api_tokens (name, role, lookup, token_hash, created_by, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING {TOKEN_COLUMNS}
"""


class NameTaken(Exception):
    """A live token already has this name."""


async def create_token(
    conn: Connection,
    *,
    name: str,
    role: str,
    lookup: str,
    token_hash: bytes,
    created_by: str,
    expires_at: datetime | None,
) -> ApiToken:
    try:
        # A savepoint: the caller's transaction (with its audit event) survives the refusal.
        async with conn.transaction():
            row = await conn.fetchrow(
                INSERT_TOKEN, name, role, lookup, token_hash, created_by, expires_at
            )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "api_tokens_live_name_idx":
            raise NameTaken(name) from None
        raise
    assert row is not None
    return ApiToken(**dict(row))


# Live tokens first (by name), then the revoked ones, newest revocation first.
SELECT_TOKENS = f"""
SELECT {TOKEN_COLUMNS} FROM api_tokens
WHERE revoked_at IS NULL OR $1
ORDER BY revoked_at IS NOT NULL, revoked_at DESC, name
"""


async def list_tokens(conn: Connection, *, include_revoked: bool) -> list[ApiToken]:
    return [ApiToken(**dict(row)) for row in await conn.fetch(SELECT_TOKENS, include_revoked)]


REVOKE_BY_ID = f"""
UPDATE api_tokens SET revoked_at = now(), revoked_by = $2
WHERE id = $1 AND revoked_at IS NULL
RETURNING {TOKEN_COLUMNS}
"""

REVOKE_BY_NAME = f"""
UPDATE api_tokens SET revoked_at = now(), revoked_by = $2
WHERE name = $1 AND revoked_at IS NULL
RETURNING {TOKEN_COLUMNS}
"""


async def revoke_token(conn: Connection, ref: uuid.UUID | str, revoked_by: str) -> ApiToken | None:
    """Revoke the live token with this id (a UUID) or name; None if there is none."""
    if isinstance(ref, uuid.UUID):
        row = await conn.fetchrow(REVOKE_BY_ID, ref, revoked_by)
    else:
        row = await conn.fetchrow(REVOKE_BY_NAME, ref, revoked_by)
    return None if row is None else ApiToken(**dict(row))


SELECT_REVOKED = """
SELECT EXISTS (
    SELECT 1 FROM api_tokens WHERE revoked_at IS NOT NULL AND (id::text = $1 OR name = $1)
)
"""


async def was_revoked(conn: Connection, ref: uuid.UUID | str) -> bool:
    """Whether a revoked token has this id or name (and no live one does: ask after trying)."""
    found: bool = await conn.fetchval(SELECT_REVOKED, str(ref))
    return found
