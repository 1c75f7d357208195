"""The audit trail: every operator action is an event (actor = the token's name), written in
the transaction of the change, and an info line on the `registry.audit` logger once it
committed, with the same fields.

Handlers whose change is one transaction use `audited()`:

    entry = audit.Entry(actor(request), "labels_set", workspace_id, {"labels": labels})
    async with audit.audited(request.app[POOL], entry) as conn:
        ...  # the change, on conn, inside the transaction; entry.detail may be filled in

Handlers that manage their own transaction call `record(conn, entry)` inside it and
`log(entry)` after it committed. A status change records its own event (actor included),
so it only needs `log()`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from registry.db import Connection

logger = logging.getLogger("registry.audit")

INSERT_AUDIT_EVENT = """
INSERT INTO workspace_events (workspace_id, kind, cause, actor, detail)
VALUES ($1, 'audit', $2, $3, $4)
"""


@dataclass(slots=True)
class Entry:
    actor: str
    action: str  # the event's `cause`
    workspace_id: uuid.UUID | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # Set False by a change that turned out to change nothing (a fan-out matching no
    # workspace): like an idempotent pause, it records no event and logs no line.
    changed: bool = True


async def record(conn: Connection, entry: Entry) -> None:
    """Write the audit event; call it inside the transaction that makes the change."""
    await conn.execute(
        INSERT_AUDIT_EVENT, entry.workspace_id, entry.action, entry.actor, entry.detail or None
    )


def log(entry: Entry) -> None:
    """The log line of a committed action, with the event's fields as separate fields."""
    logger.info(
        "%s by %s",
        entry.action,
        entry.actor,
        extra={
            "actor": entry.actor,
            "action": entry.action,
            "workspace_id": None if entry.workspace_id is None else str(entry.workspace_id),
            "detail": entry.detail,
        },
    )


@contextlib.asynccontextmanager
async def audited(pool: asyncpg.Pool, entry: Entry) -> AsyncIterator[Connection]:
    """A transaction for the change; its audit event is written at the end of it (so the
    detail may be filled in by the change), and logged once it committed."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn
        if entry.changed:
            await record(conn, entry)
    if entry.changed:
        log(entry)
