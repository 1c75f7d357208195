"""The dashboard's sessions: opened at login, found on every request, ended by logout, by
expiry or by the revocation of the token that opened them (migrations/0018_ui_sessions.sql).

Every time is the database's clock, so all replicas agree when a session expires.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from registry.db import Connection

# Expired sessions are deleted as new ones open: the table holds at most a working day's logins.
DELETE_EXPIRED = "DELETE FROM ui_sessions WHERE expires_at <= now()"

# The token is named by its lookup handle (what the login was given); its id is the reference.
INSERT_SESSION = """
INSERT INTO ui_sessions (id_hash, name, role, token_id, admin_check, expires_at)
SELECT $1, $2, $3, (SELECT id FROM api_tokens WHERE lookup = $4), $5,
       now() + make_interval(secs => $6)
"""


async def open_session(
    conn: Connection,
    *,
    id_hash: bytes,
    name: str,
    role: str,
    token_lookup: str | None,
    admin_check: bytes | None,
    ttl_s: float,
) -> None:
    async with conn.transaction():
        await conn.execute(DELETE_EXPIRED)
        await conn.execute(INSERT_SESSION, id_hash, name, role, token_lookup, admin_check, ttl_s)


@dataclass(frozen=True, slots=True)
class FoundSession:
    name: str
    role: str
    admin_check: bytes | None  # None: opened with an API token
    token_dead: bool  # its API token was revoked or expired since the login


# One probe per request: the session, unexpired, and the state of its token.
SELECT_SESSION = """
SELECT s.name, s.role, s.admin_check,
       s.token_id IS NOT NULL
       AND (t.revoked_at IS NOT NULL OR (t.expires_at IS NOT NULL AND t.expires_at <= now()))
       AS token_dead
FROM ui_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id
WHERE s.id_hash = $1 AND s.expires_at > now()
"""


async def find_session(conn: Connection, id_hash: bytes) -> FoundSession | None:
    row = await conn.fetchrow(SELECT_SESSION, id_hash)
    return None if row is None else FoundSession(**dict(row))


DELETE_SESSION = "DELETE FROM ui_sessions WHERE id_hash = $1"


async def end_session(conn: Connection, id_hash: bytes) -> None:
    await conn.execute(DELETE_SESSION, id_hash)


DELETE_TOKEN_SESSIONS = "DELETE FROM ui_sessions WHERE token_id = $1"


async def end_token_sessions(conn: Connection, token_id: uuid.UUID) -> int:
    """End every session opened with this token; how many there were."""
    status: str = await conn.execute(DELETE_TOKEN_SESSIONS, token_id)
    return int(status.rsplit(" ", 1)[1])
