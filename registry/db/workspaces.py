"""Workspace rows: creating a workspace with its declared plugins, and reading it back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from registry.db import Connection
from registry.db.events import insert_status_event
from registry.ids import uuid7
from registry.statuses import Status


@dataclass(frozen=True, slots=True)
class DeclaredPlugin:
    name: str
    source: str


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    name: str
    source: str
    sha: str
    installed_at: datetime
    # Content digest of what was delivered; a runtime may report it instead of `sha` (it
    # cannot know a git commit from the files). None for plugins installed before it existed.
    digest: str | None = None

    def reported_as(self, observed_sha: str | None) -> bool:
        return observed_sha is not None and observed_sha in (self.sha, self.digest)


@dataclass(frozen=True, slots=True)
class Workspace:
    id: uuid.UUID
    name: str
    status: Status
    status_changed_at: datetime
    created_at: datetime
    delivery: str
    url: str | None
    agent_card: Any
    last_heartbeat_at: datetime | None
    error_rate: float | None
    sample_error: str | None
    active_tasks: int | None
    uptime_seconds: float | None
    current_task: str | None
    monthly_spend: float | None
    runtime_state: str | None
    observed_plugins: list[dict[str, Any]] | None
    heartbeat_interval_s: float | None = None  # the runtime's own, as observed
    token_rotated_at: datetime | None = None
    previous_token_valid_until: datetime | None = None
    previous_token_used_at: datetime | None = None
    # The last refused runtime request, and how many since the first after the last beat.
    refused_at: datetime | None = None
    refused_since: datetime | None = None
    refused_count: int = 0
    refused_status: int | None = None
    refused_code: str | None = None
    refused_field: str | None = None
    labels: dict[str, str] | None = None

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Workspace:
        values = {name: row[name] for name in cls.__slots__}
        values["status"] = Status(row["status"])
        return cls(**values)


# The runtime's report of its plugins lives beside the row (migration 0019); `id` in the
# subquery is the outer row's (reported_plugins has no column of that name).
WORKSPACE_COLUMNS = """
    id, name, status, status_changed_at, created_at, delivery, url, agent_card,
    last_heartbeat_at, error_rate, sample_error, active_tasks, uptime_seconds, current_task,
    monthly_spend, runtime_state,
    (SELECT r.plugins FROM reported_plugins r WHERE r.workspace_id = id) AS observed_plugins,
    heartbeat_interval_s, token_rotated_at,
    previous_token_valid_until, previous_token_used_at, refused_at, refused_since,
    refused_count, refused_status, refused_code, refused_field, labels
"""

# Names are unique among live workspaces (workspaces_live_name_idx). A create racing another
# of the same name waits for it here and then inserts nothing, instead of failing with a
# unique violation: the caller answers 409 with the id of the one that won.
INSERT_WORKSPACE = f"""
INSERT INTO workspaces (id, name, status, token_hash, delivery, url, labels)
VALUES ($6, $1, $2, $3, $4, $5, $7)
ON CONFLICT (name) WHERE status <> 'removed' DO NOTHING
RETURNING {WORKSPACE_COLUMNS}
"""
SELECT_LIVE_ID_BY_NAME = "SELECT id FROM workspaces WHERE name = $1 AND status <> 'removed'"


class NameTaken(Exception):
    """A live workspace already has this name."""

    def __init__(self, existing_id: uuid.UUID) -> None:
        super().__init__(f"name taken by {existing_id}")
        self.existing_id = existing_id


async def live_id_by_name(conn: Connection, name: str) -> uuid.UUID | None:
    value = await conn.fetchval(SELECT_LIVE_ID_BY_NAME, name)
    return value if isinstance(value, uuid.UUID) else None


INSERT_DECLARED = """
INSERT INTO declared_plugins (workspace_id, name, source, position)
SELECT $1, d.name, d.source, d.position
FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS d(name, source, position)
"""


async def create_workspace(
    conn: Connection,
    *,
    name: str,
    token_hash: bytes,
    delivery: str,
    url: str | None,
    plugins: list[DeclaredPlugin],
    labels: dict[str, str] | None = None,
    actor: str,
) -> Workspace:
    """Insert a provisioning workspace, its declared plugins and its creation event; raises
    NameTaken if a live workspace has the name."""
    # Again only when the holder of the name was removed between the insert that found it and
    # the read of its id: the name is free then, and the next insert takes it or finds the
    # workspace that did.
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(
                INSERT_WORKSPACE,
                name,
                Status.PROVISIONING.value,
                token_hash,
                delivery,
                url,
                uuid7(),
                labels or {},
            )
            if row is not None:
                return await _created(conn, Workspace.from_record(row), plugins, actor)
            existing = await live_id_by_name(conn, name)
            if existing is not None:
                raise NameTaken(existing)


async def _created(
    conn: Connection, workspace: Workspace, plugins: list[DeclaredPlugin], actor: str
) -> Workspace:
    """The rest of a create, in its transaction: declared plugins and the creation event."""
    await conn.execute(
        INSERT_DECLARED, workspace.id, [p.name for p in plugins], [p.source for p in plugins]
    )
    await insert_status_event(
        conn, workspace.id, None, Status.PROVISIONING, cause="created", actor=actor
    )
    return workspace


# Tombstones included (migration 0017's view): a removed workspace is shown until pruned.
SELECT_WORKSPACE = f"SELECT {WORKSPACE_COLUMNS} FROM all_workspaces WHERE id = $1"


async def get_workspace(conn: Connection, workspace_id: uuid.UUID) -> Workspace | None:
    row = await conn.fetchrow(SELECT_WORKSPACE, workspace_id)
    return None if row is None else Workspace.from_record(row)


DELETE_DECLARED = "DELETE FROM declared_plugins WHERE workspace_id = $1"


async def replace_declared(
    conn: Connection, workspace_id: uuid.UUID, plugins: list[DeclaredPlugin]
) -> None:
    """Replace the declared set; call inside the transaction that queues its reconcile."""
    await conn.execute(DELETE_DECLARED, workspace_id)
    await conn.execute(
        INSERT_DECLARED, workspace_id, [p.name for p in plugins], [p.source for p in plugins]
    )


WORKSPACE_EXISTS = "SELECT EXISTS (SELECT 1 FROM all_workspaces WHERE id = $1)"


async def workspace_exists(conn: Connection, workspace_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval(WORKSPACE_EXISTS, workspace_id))


# Tombstones are rows of `removed_workspaces` (migration 0017), whose status never changes
# again: a workspace found there is removed, with no lock to hold.
TOMBSTONE_EXISTS = "SELECT EXISTS (SELECT 1 FROM removed_workspaces WHERE id = $1)"


async def is_tombstone(conn: Connection, workspace_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval(TOMBSTONE_EXISTS, workspace_id))


SELECT_NAMES = "SELECT id, name FROM all_workspaces WHERE id = ANY($1::uuid[])"


async def names_of(conn: Connection, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Names by id, in one query (tombstones included: history outlives its workspace)."""
    if not ids:
        return {}
    return {row["id"]: row["name"] for row in await conn.fetch(SELECT_NAMES, list(ids))}


SELECT_DECLARED = """
SELECT name, source FROM declared_plugins WHERE workspace_id = $1 ORDER BY position, name
"""


async def declared_plugins(conn: Connection, workspace_id: uuid.UUID) -> list[DeclaredPlugin]:
    rows = await conn.fetch(SELECT_DECLARED, workspace_id)
    return [DeclaredPlugin(row["name"], row["source"]) for row in rows]


SELECT_INSTALLED = """
SELECT name, source, sha, installed_at, digest FROM installed_plugins
WHERE workspace_id = $1 ORDER BY name
"""


async def installed_plugins(conn: Connection, workspace_id: uuid.UUID) -> list[InstalledPlugin]:
    rows = await conn.fetch(SELECT_INSTALLED, workspace_id)
    return [InstalledPlugin(**dict(row)) for row in rows]


SELECT_DECLARED_OF = """
SELECT workspace_id, name, source FROM declared_plugins WHERE workspace_id = ANY($1::uuid[])
ORDER BY workspace_id, position, name
"""
SELECT_INSTALLED_OF = """
SELECT workspace_id, name, source, sha, installed_at, digest FROM installed_plugins
WHERE workspace_id = ANY($1::uuid[]) ORDER BY workspace_id, name
"""


async def declared_plugins_of(
    conn: Connection, workspace_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[DeclaredPlugin]]:
    """The declared sets of a page of workspaces, in one statement."""
    found: dict[uuid.UUID, list[DeclaredPlugin]] = {id_: [] for id_ in workspace_ids}
    for row in await conn.fetch(SELECT_DECLARED_OF, workspace_ids):
        found[row["workspace_id"]].append(DeclaredPlugin(row["name"], row["source"]))
    return found


async def installed_plugins_of(
    conn: Connection, workspace_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[InstalledPlugin]]:
    found: dict[uuid.UUID, list[InstalledPlugin]] = {id_: [] for id_ in workspace_ids}
    for row in await conn.fetch(SELECT_INSTALLED_OF, workspace_ids):
        values = dict(row)
        found[values.pop("workspace_id")].append(InstalledPlugin(**values))
    return found


UPSERT_INSTALLED = """
INSERT INTO installed_plugins (workspace_id, name, source, sha, digest)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (workspace_id, name)
DO UPDATE SET source = EXCLUDED.source, sha = EXCLUDED.sha, digest = EXCLUDED.digest,
              installed_at = now()
"""


async def record_installed(
    conn: Connection,
    workspace_id: uuid.UUID,
    name: str,
    source: str,
    sha: str,
    digest: str | None = None,
) -> None:
    """Called only after the plugin's bytes were delivered (DESIGN lesson 7)."""
    await conn.execute(UPSERT_INSTALLED, workspace_id, name, source, sha, digest)


DELETE_INSTALLED = "DELETE FROM installed_plugins WHERE workspace_id = $1 AND name = $2"


async def forget_installed(conn: Connection, workspace_id: uuid.UUID, name: str) -> None:
    """Called only after the plugin was removed from the box."""
    await conn.execute(DELETE_INSTALLED, workspace_id, name)


# Keyset pagination on id: stable under inserts, one index range scan per page. One
# statement per filter shape (never "$1 IS NULL OR status = $1"): each one's generic plan is
# the right one, the first page starts after the nil uuid. Tombstones live in a table of
# their own (migration 0017): read only when asked for, never passed over.
FIRST_ID = uuid.UUID(int=0)

SELECT_LIVE_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM workspaces
WHERE id > $1
ORDER BY id
LIMIT $2
"""

# Both tables' primary keys, merged in id order.
SELECT_ALL_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM all_workspaces
WHERE id > $1
ORDER BY id
LIMIT $2
"""

SELECT_STATUS_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM workspaces
WHERE status = $3 AND id > $1
ORDER BY status, id
LIMIT $2
"""

SELECT_REMOVED_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM removed_workspaces
WHERE id > $1
ORDER BY id
LIMIT $2
"""


async def list_workspaces(
    conn: Connection,
    *,
    status: str | None,
    after: uuid.UUID | None,
    limit: int,
    include_removed: bool = False,
) -> list[Workspace]:
    start = FIRST_ID if after is None else after
    if status == Status.REMOVED.value:
        rows = await conn.fetch(SELECT_REMOVED_PAGE, start, limit)
    elif status is not None:
        rows = await conn.fetch(SELECT_STATUS_PAGE, start, limit, status)
    elif include_removed:
        rows = await conn.fetch(SELECT_ALL_PAGE, start, limit)
    else:
        rows = await conn.fetch(SELECT_LIVE_PAGE, start, limit)
    return [Workspace.from_record(row) for row in rows]


# The previous token stays valid until the grace period ends (at once for 0), and is still
# recognised afterwards to answer `token_rotated`; a second rotation forgets the oldest. The
# event is written in the same statement.
ROTATE_TOKEN = """
WITH rotated AS (
    UPDATE workspaces SET
        previous_token_hash = token_hash,
        previous_token_valid_until = now() + make_interval(secs => $3),
        previous_token_used_at = NULL,
        token_rotated_at = now(),
        token_hash = $2
    WHERE id = $1 AND status <> 'removed'
    RETURNING id, previous_token_valid_until
),
event AS (
    INSERT INTO workspace_events (workspace_id, kind, cause, actor, detail)
    SELECT id, 'token', 'token_rotated', $4,
           jsonb_build_object('grace_s', $3::float8,
                              'previous_token_valid_until', previous_token_valid_until)
    FROM rotated
)
SELECT previous_token_valid_until FROM rotated
"""


async def rotate_token(
    conn: Connection,
    workspace_id: uuid.UUID,
    token_hash: bytes,
    *,
    grace_s: float,
    actor: str,
) -> datetime | None:
    """Replace the token; returns until when the previous one works, None if not rotated."""
    value = await conn.fetchval(ROTATE_TOKEN, workspace_id, token_hash, grace_s, actor)
    return value if isinstance(value, datetime) else None


# Labels: a merge (set some, remove some) or a replacement, checked against the cap in the
# same statement so two concurrent merges cannot together exceed it. Tombstones keep theirs.
MERGE_LABELS = """
UPDATE workspaces SET labels = (labels - $3::text[]) || $2::jsonb
WHERE id = $1 AND status <> 'removed'
RETURNING labels
"""
REPLACE_LABELS = """
UPDATE workspaces SET labels = $2::jsonb
WHERE id = $1 AND status <> 'removed'
RETURNING labels
"""


async def merge_labels(
    conn: Connection, workspace_id: uuid.UUID, sets: dict[str, str], removes: list[str]
) -> dict[str, str] | None:
    """The labels after the merge; None if the workspace is unknown or removed. Call in a
    transaction: the caller checks the result against the cap and rolls back if over."""
    value = await conn.fetchval(MERGE_LABELS, workspace_id, sets, removes)
    return value if isinstance(value, dict) else None


async def replace_labels(
    conn: Connection, workspace_id: uuid.UUID, labels: dict[str, str]
) -> dict[str, str] | None:
    value = await conn.fetchval(REPLACE_LABELS, workspace_id, labels)
    return value if isinstance(value, dict) else None
