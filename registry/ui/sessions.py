"""Browser sessions of the dashboard, kept in this process's memory.

The cookie carries a random session id; only its hash is kept here, with the name and role of
the token that logged in and the token's lookup handle (never the token): every request
re-reads that token's row, so revoking or expiring the token ends its sessions at once.
Sessions live in one process: behind several registries a balancer needs sticky sessions, and
a restart logs everybody out (a known limit of this first version).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

COOKIE = "registry_session"
# An operator's working day; the cookie's Max-Age says the same to the browser.
SESSION_TTL_S = 8 * 3600
# Enough for every operator of a fleet; beyond it the oldest sessions go first.
MAX_SESSIONS = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    role: str
    lookup: str | None  # None: the bootstrap admin, which has no row to re-read
    expires_at: float


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[bytes, Session] = {}

    def create(self, name: str, role: str, lookup: str | None, now: float) -> str:
        self._prune(now)
        session_id = secrets.token_urlsafe(32)
        self._sessions[_key(session_id)] = Session(name, role, lookup, now + SESSION_TTL_S)
        return session_id

    def find(self, session_id: str, now: float) -> Session | None:
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is not None and session.expires_at <= now:
            del self._sessions[key]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(_key(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _prune(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            # dicts keep insertion order: the first key is the oldest session.
            del self._sessions[next(iter(self._sessions))]
