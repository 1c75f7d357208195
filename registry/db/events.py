"""The workspace event log: status changes and reconcile outcomes, oldest first."""

from __future__ import annotations

import uuid
from typing import Any

from registry.db import Connection
from registry.statuses import Status

INSERT_EVENT = """
INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""


async def insert_status_event(
    conn: Connection,
    workspace_id: uuid.UUID,
    from_status: Status | None,
    to_status: Status,
    *,
    cause: str,
    actor: str,
) -> None:
    """Record a status change; call it inside the transaction that made the change."""
    await conn.execute(
        INSERT_EVENT,
        workspace_id,
        "status",
        None if from_status is None else from_status.value,
        to_status.value,
        cause,
        actor,
        None,
    )


async def insert_reconcile_event(
    conn: Connection, workspace_id: uuid.UUID, cause: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        INSERT_EVENT, workspace_id, "reconcile", None, None, cause, "reconciler", detail
    )
