"""Actions asked of a runtime (restarts) that it has not acknowledged yet."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from registry.db import Connection


@dataclass(frozen=True, slots=True)
class PendingAction:
    id: uuid.UUID
    type: str
    reason: str
    created_at: datetime
    delivered_at: datetime | None  # first handed out in a heartbeat answer; None: not yet


SELECT_PENDING = """
SELECT id, type, reason, created_at, delivered_at FROM workspace_actions
WHERE workspace_id = $1 AND acked_at IS NULL
ORDER BY created_at
"""


async def pending_actions(conn: Connection, workspace_id: uuid.UUID) -> list[PendingAction]:
    return [PendingAction(**dict(row)) for row in await conn.fetch(SELECT_PENDING, workspace_id)]


SELECT_PENDING_OF = """
SELECT workspace_id, id, type, reason, created_at, delivered_at FROM workspace_actions
WHERE workspace_id = ANY($1::uuid[]) AND acked_at IS NULL
ORDER BY workspace_id, created_at
"""


async def pending_actions_of(
    conn: Connection, workspace_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[PendingAction]]:
    """The pending actions of a page of workspaces, in one statement."""
    found: dict[uuid.UUID, list[PendingAction]] = {id_: [] for id_ in workspace_ids}
    for row in await conn.fetch(SELECT_PENDING_OF, workspace_ids):
        values = dict(row)
        found[values.pop("workspace_id")].append(PendingAction(**values))
    return found
