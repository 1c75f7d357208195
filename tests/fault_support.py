"""Helpers for the fault-injection and soak tests: bounded requests that never raise on an
answer, direct status writes that keep the event chain intact, and process/database probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.processes import RegistryProcess
from tests.support import ADMIN, Workspace, bearer

# No request to a registry may take longer than this, whatever the database does.
REQUEST_BOUND_S = 10.0


@dataclass
class Answer:
    """One HTTP exchange: its status (None: no answer at all), headers, body and duration."""

    status: int | None
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: str | None = None  # a connection-level failure or a timeout, as text

    @property
    def error_code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return code if isinstance(code, str) else None
        return None


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    bound_s: float = REQUEST_BOUND_S,
) -> Answer:
    """POST and describe what came back; a refused connection or a timeout is an Answer too."""
    started = time.monotonic()
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=bound_s)
        ) as response:
            raw = await response.read()
            try:
                parsed: Any = await response.json(content_type=None) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return Answer(
                response.status, time.monotonic() - started, dict(response.headers), parsed
            )
    except TimeoutError:
        return Answer(None, time.monotonic() - started, error="timeout")
    except aiohttp.ClientError as exc:
        return Answer(None, time.monotonic() - started, error=repr(exc))


async def get_status(session: aiohttp.ClientSession, url: str, bound_s: float = 5.0) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=bound_s)) as response:
            await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError):
        return None


async def heartbeat(
    session: aiohttp.ClientSession, base: str, workspace: Workspace, **fields: Any
) -> Answer:
    return await post_json(
        session,
        f"{base}/registry/heartbeat",
        {"workspace_id": workspace.id, **fields},
        bearer(workspace.token),
    )


async def request_reconcile(
    session: aiohttp.ClientSession, base: str, workspace: Workspace
) -> Answer:
    return await post_json(
        session,
        f"{base}/internal/workspaces/{workspace.id}/reconcile",
        {"refresh": False},
        ADMIN,
    )


# Takes a live workspace offline the way the sweeper does: the change and its event in one
# statement, so the workspace's event chain stays whole. Returns the database's clock of the
# change, or nothing when the workspace was not live.
SET_OFFLINE = """
WITH changed AS (
    UPDATE workspaces SET status = 'offline', status_changed_at = now()
    WHERE id = $1 AND status IN ('online', 'degraded')
    RETURNING id
),
event AS (
    INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor)
    SELECT w.id, 'status', w.status, 'offline', 'test_fault', 'test'
    FROM workspaces w JOIN changed c ON c.id = w.id
)
SELECT clock_timestamp() FROM changed
"""


async def set_offline(conn: asyncpg.Connection | asyncpg.Pool, workspace_id: str) -> Any:
    """The database time the workspace went offline, or None if it was not live."""
    return await conn.fetchval(SET_OFFLINE, uuid.UUID(workspace_id))


STATUS_EVENTS = """
SELECT id, from_status, to_status, cause FROM workspace_events
WHERE workspace_id = $1 AND kind = 'status' ORDER BY id
"""


async def status_events(conn: asyncpg.Connection | asyncpg.Pool, workspace_id: str) -> list[Any]:
    return list(await conn.fetch(STATUS_EVENTS, uuid.UUID(workspace_id)))


def chain_breaks(events: list[Any], current: str) -> list[str]:
    """Where a workspace's status events do not link up (from = the previous to), or where
    the last one disagrees with the status the workspace has now."""
    problems = []
    previous = None
    for event in events:
        if event["from_status"] != previous:
            problems.append(
                f"event {event['id']} {event['from_status']}->{event['to_status']}"
                f" follows {previous}"
            )
        if event["from_status"] == event["to_status"]:
            problems.append(f"event {event['id']} changes nothing: {event['to_status']}")
        previous = event["to_status"]
    if previous != current:
        problems.append(f"last event ends in {previous}, the workspace is {current}")
    return problems


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


SERVER_CONNECTIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND pid <> pg_backend_pid() AND application_name <> $1 AND backend_start >= $2
"""


async def server_connections(conn: asyncpg.Connection, exclude_application: str, since: Any) -> int:
    """Server connections to this database opened since `since` (the database's clock),
    other than this one and the test's own (opened with application_name
    `exclude_application`)."""
    value = await conn.fetchval(SERVER_CONNECTIONS, exclude_application, since)
    return int(value)


def assert_alive(process: RegistryProcess) -> None:
    code = process.process.poll()
    assert code is None, f"registry exited with {code}:\n{process.log()[-6000:]}"


async def poll(check: Any, within_s: float, interval_s: float = 0.1) -> bool:
    """Await `check()` until it is true or the deadline passes; its last verdict."""
    deadline = time.monotonic() + within_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
