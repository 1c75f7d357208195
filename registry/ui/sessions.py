"""Browser sessions of the dashboard: the cookie, its lifetime, and what of it is kept.

The cookie carries a random session id; the database keeps only its SHA-256
(registry/db/ui_sessions.py), with the name and role of the token that logged in and a
reference to that token (never the token), so a restart keeps the session, every replica
honours it, and revoking or expiring the token ends it.
"""

from __future__ import annotations

import hashlib
import secrets

COOKIE = "registry_session"
# An operator's working day; the cookie's Max-Age says the same to the browser.
SESSION_TTL_S = 8 * 3600


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(session_id: str) -> bytes:
    """What the database keeps of a session id: 256 random bits need no slow hash."""
    return hashlib.sha256(session_id.encode()).digest()


def admin_check(key: bytes, admin_token: str) -> bytes:
    """Ties a bootstrap admin's session to the admin token it was opened with, salted by the
    session, so the row does not hold a reusable hash of the token: a session opened before
    REGISTRY_ADMIN_TOKEN changed no longer matches."""
    return hashlib.sha256(key + admin_token.encode()).digest()
