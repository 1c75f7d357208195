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
