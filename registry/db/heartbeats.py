"""The heartbeat statement: read the previous status and apply the beat in one round trip."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from registry.db import Connection
from registry.statuses import (
    HEARTBEAT_TABLES,
    LIVE_STATUSES,
    RECONCILE_ENTRY_FROM,
    Health,
    Status,
)


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat (or registration), validated."""

    workspace_id: uuid.UUID
    token_hash: bytes
    health: Health
    # None: not reported by this beat; the stored value stays.
    error_rate: float | None
    sample_error: str | None
    active_tasks: int | None
    uptime_seconds: float | None
    current_task: str | None
    monthly_spend: float | None
    runtime_state: str | None
    observed_plugins: list[dict[str, str]] | None
    acks: list[uuid.UUID]
    # Set by register only: where the workspace can be reached, and its agent card.
    url: str | None = None
    agent_card: Any = None
    cause: str = "heartbeat"


@dataclass(frozen=True, slots=True)
class BeatResult:
    """What the statement saw and did. `status` is None when nothing was written."""

    previous_status: Status | None  # None: no workspace with this id and token
    status: Status | None
    reconcile_id: uuid.UUID | None  # a reconcile intent this beat committed
    actions: list[dict[str, Any]]

    @property
    def reconcile_queued(self) -> bool:
        return self.reconcile_id is not None


# One statement, one transaction, the row locked for its whole duration: of any number of
# concurrent beats for one workspace, exactly one sees `provisioning` (DESIGN lesson 1).
# Side effects (event, reconcile intent) come only from rows the UPDATE returned (lesson 3).
# The transition table is a parameter so statuses.py stays the one owner of the rules.
HEARTBEAT = """
WITH target AS (
    SELECT w.id, w.status AS previous_status
    FROM workspaces w
    WHERE w.id = $1 AND w.token_hash = $2
    FOR UPDATE
),
transition AS (
    SELECT t.id, t.previous_status, COALESCE(m.to_status, t.previous_status) AS status
    FROM target t
    LEFT JOIN unnest($12::text[], $13::text[]) AS m(from_status, to_status)
        ON m.from_status = t.previous_status
    WHERE t.previous_status <> 'removed'
),
beat AS (
    UPDATE workspaces w SET
        status = tr.status,
        status_changed_at = CASE WHEN tr.status <> tr.previous_status
                                 THEN now() ELSE w.status_changed_at END,
        last_heartbeat_at = now(),
        -- NULL means "not reported" (register, or no plugins list): keep what we had.
        error_rate = COALESCE($3, w.error_rate),
        sample_error = COALESCE($4, w.sample_error),
        active_tasks = COALESCE($5, w.active_tasks),
        uptime_seconds = COALESCE($6, w.uptime_seconds),
        current_task = COALESCE($7, w.current_task),
        monthly_spend = COALESCE($8, w.monthly_spend),
        runtime_state = COALESCE($9, w.runtime_state),
        observed_plugins = COALESCE($10, w.observed_plugins),
        url = COALESCE($16, w.url),
        agent_card = COALESCE($17, w.agent_card)
    FROM transition tr
    WHERE w.id = tr.id
    RETURNING w.id, tr.previous_status, w.status
),
event AS (
    INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor)
    SELECT b.id, 'status', b.previous_status, b.status, $18, 'runtime'
    FROM beat b
    WHERE b.status <> b.previous_status
),
intent AS (
    INSERT INTO reconciles (workspace_id, trigger)
    SELECT b.id, 'online_transition'
    FROM beat b
    WHERE b.previous_status = ANY($14::text[]) AND b.status = ANY($15::text[])
    -- A queued run already covers this entry; fold into it.
    ON CONFLICT (workspace_id) WHERE status = 'queued' DO NOTHING
    RETURNING id
),
acked AS (
    UPDATE workspace_actions a SET acked_at = now()
    FROM beat b
    WHERE a.workspace_id = b.id AND a.id = ANY($11::uuid[]) AND a.acked_at IS NULL
)
SELECT
    t.previous_status,
    b.status,
    (SELECT i.id FROM intent i) AS reconcile_id,
    CASE WHEN b.id IS NULL THEN NULL ELSE (
        SELECT COALESCE(jsonb_agg(jsonb_build_object(
                   'id', a.id, 'type', a.type, 'reason', a.reason) ORDER BY a.created_at), '[]')
        FROM workspace_actions a
        WHERE a.workspace_id = b.id AND a.acked_at IS NULL AND a.id <> ALL($11::uuid[])
    ) END AS actions
FROM target t
LEFT JOIN beat b ON b.id = t.id
"""


async def apply_beat(conn: Connection, beat: Beat) -> BeatResult:
    table = HEARTBEAT_TABLES[beat.health]
    row = await conn.fetchrow(
        HEARTBEAT,
        beat.workspace_id,
        beat.token_hash,
        beat.error_rate,
        beat.sample_error,
        beat.active_tasks,
        beat.uptime_seconds,
        beat.current_task,
        beat.monthly_spend,
        beat.runtime_state,
        beat.observed_plugins,
        beat.acks,
        table.from_statuses,
        table.to_statuses,
        RECONCILE_ENTRY_FROM,
        LIVE_STATUSES,
        beat.url,
        beat.agent_card,
        beat.cause,
    )
    if row is None:
        return BeatResult(None, None, None, [])
    status = None if row["status"] is None else Status(row["status"])
    return BeatResult(
        Status(row["previous_status"]), status, row["reconcile_id"], row["actions"] or []
    )


SELECT_WORKSPACE_BY_TOKEN = "SELECT id FROM workspaces WHERE token_hash = $1"


async def workspace_for_token(conn: Connection, token_hash: bytes) -> uuid.UUID | None:
    """Slow path for a beat that matched nothing: whose token is this, if anyone's?"""
    value = await conn.fetchval(SELECT_WORKSPACE_BY_TOKEN, token_hash)
    return value if isinstance(value, uuid.UUID) else None
