"""The workspace event log: status changes and reconcile outcomes, oldest first."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
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


# The event of the change into the current status (the newest, so unsequenced ones first;
# the (workspace_id, seq) index walks backwards). None when retention pruned it or a writer
# recorded none.
SELECT_STATUS_CAUSE = """
SELECT cause FROM workspace_events
WHERE workspace_id = $1 AND kind = 'status' AND to_status = $2 AND at >= $3
ORDER BY seq DESC NULLS FIRST, id DESC
LIMIT 1
"""


async def status_cause(
    conn: Connection, workspace_id: uuid.UUID, status: Status, since: datetime
) -> str | None:
    """The cause recorded with the change into `status` at `since` (its status_changed_at)."""
    cause: str | None = await conn.fetchval(SELECT_STATUS_CAUSE, workspace_id, status.value, since)
    return cause


# For a page, each workspace's walk stops after its latest PAGE_CAUSE_WALK events: a cause
# found nowhere (pruned, or never written) would otherwise cost a walk through the workspace's
# whole history — at 10M events ~7,500 buffers and 175 ms for a page of 100, ~2,200 and 47 ms
# bounded (docs/benchmarks.md). A status reached longer ago than that shows no cause in a
# list; the workspace's own view (status_cause) still looks through everything.
PAGE_CAUSE_WALK = 100
SELECT_STATUS_CAUSES = f"""
SELECT w.id, e.cause
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS w(id, status, since)
CROSS JOIN LATERAL (
    SELECT cause FROM (
        SELECT kind, to_status, at, cause, seq, id FROM workspace_events
        WHERE workspace_id = w.id
        ORDER BY seq DESC NULLS FIRST, id DESC
        LIMIT {PAGE_CAUSE_WALK}
    ) latest
    WHERE kind = 'status' AND to_status = w.status AND at >= w.since
    ORDER BY seq DESC NULLS FIRST, id DESC
    LIMIT 1
) e
"""


async def status_causes(
    conn: Connection, changes: list[tuple[uuid.UUID, Status, datetime]]
) -> dict[uuid.UUID, str]:
    """status_cause() for a page of workspaces: (id, status, status_changed_at) each."""
    rows = await conn.fetch(
        SELECT_STATUS_CAUSES,
        [id_ for id_, _, _ in changes],
        [status.value for _, status, _ in changes],
        [since for _, _, since in changes],
    )
    return {row["id"]: row["cause"] for row in rows}


@dataclass(frozen=True, slots=True)
class Event:
    id: int  # the sequence number: commit-ordered, what clients resume after
    workspace_id: uuid.UUID | None
    kind: str
    from_status: str | None
    to_status: str | None
    cause: str
    actor: str
    detail: Any
    at: datetime


SEQUENCE_LOCK_KEY = 0x6576_656E_7473  # "events"

TRY_SEQUENCE_LOCK = "SELECT pg_try_advisory_xact_lock($1)"

# Number committed events in id order after the highest number given so far. Run by one
# process at a time (the advisory lock), it only ever sees committed rows, so a reader that
# resumes after seq N can never miss an event that committed after it read N.
SEQUENCE_PENDING = """
WITH top AS (SELECT COALESCE(max(seq), 0) AS seq FROM workspace_events),
pending AS (
    SELECT id, row_number() OVER (ORDER BY id) AS n
    FROM workspace_events WHERE seq IS NULL
    ORDER BY id
    LIMIT $1
)
UPDATE workspace_events e SET seq = top.seq + pending.n
FROM pending, top
WHERE e.id = pending.id
RETURNING e.seq
"""

NOTIFY = "SELECT pg_notify($1, $2)"

EVENTS_CHANNEL = "registry_events"


async def sequence_pending(conn: Connection, batch: int = 5000) -> int | None:
    """Give pending events their sequence numbers; the highest one given, or None."""
    async with conn.transaction():
        if not await conn.fetchval(TRY_SEQUENCE_LOCK, SEQUENCE_LOCK_KEY):
            return None
        numbers = [row["seq"] for row in await conn.fetch(SEQUENCE_PENDING, batch)]
        if not numbers:
            return None
        top = int(max(numbers))
        # Delivered at commit, to every registry process listening.
        await conn.execute(NOTIFY, EVENTS_CHANNEL, str(top))
    return top


EVENT_COLUMNS = """
    seq AS id, workspace_id, kind, from_status, to_status, cause, actor, detail, at
"""

# One statement per filter shape, never "$2 IS NULL OR workspace_id = $2": a prepared
# statement's generic plan cannot know which half applies, and at millions of rows it walked
# the whole seq index filtering on workspace_id (1.3 s instead of 0.05 ms).
SELECT_EVENTS_AFTER = f"""
SELECT {EVENT_COLUMNS} FROM workspace_events
WHERE seq > $1
ORDER BY seq
LIMIT $2
"""

SELECT_WORKSPACE_EVENTS_AFTER = f"""
SELECT {EVENT_COLUMNS} FROM workspace_events
WHERE workspace_id = $2 AND seq > $1
ORDER BY seq
LIMIT $3
"""

SELECT_LAST_SEQ = "SELECT COALESCE(max(seq), 0) FROM workspace_events"


async def events_after(
    conn: Connection, after: int, *, workspace_id: uuid.UUID | None, limit: int
) -> list[Event]:
    if workspace_id is None:
        rows = await conn.fetch(SELECT_EVENTS_AFTER, after, limit)
    else:
        rows = await conn.fetch(SELECT_WORKSPACE_EVENTS_AFTER, after, workspace_id, limit)
    return [Event(**dict(row)) for row in rows]


async def last_sequence(conn: Connection) -> int:
    return int(await conn.fetchval(SELECT_LAST_SEQ))


# A resuming subscriber's own catch-up: what it missed, up to where the process's one feed
# took over (the feed delivers everything after `upto`). One statement per filter shape, as
# above.
SELECT_EVENTS_BETWEEN = f"""
SELECT {EVENT_COLUMNS} FROM workspace_events
WHERE seq > $1 AND seq <= $2
ORDER BY seq
LIMIT $3
"""

SELECT_WORKSPACE_EVENTS_BETWEEN = f"""
SELECT {EVENT_COLUMNS} FROM workspace_events
WHERE workspace_id = $3 AND seq > $1 AND seq <= $2
ORDER BY seq
LIMIT $4
"""


async def events_between(
    conn: Connection, after: int, upto: int, *, workspace_id: uuid.UUID | None, limit: int
) -> list[Event]:
    if workspace_id is None:
        rows = await conn.fetch(SELECT_EVENTS_BETWEEN, after, upto, limit)
    else:
        rows = await conn.fetch(SELECT_WORKSPACE_EVENTS_BETWEEN, after, upto, workspace_id, limit)
    return [Event(**dict(row)) for row in rows]
