"""Test helpers: drive the registry over HTTP the way runtimes and operators do."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from registry.db.heartbeats import Beat
from registry.settings import Settings
from registry.statuses import LEGAL_TRANSITIONS, Health, Status

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# What `aiohttp_client(create_app(...))` returns: a client whose `.app` is the application.
AppClient = TestClient[web.Request, web.Application]


def beat(
    workspace_id: uuid.UUID,
    token_hash: bytes,
    sample_error: str = "",
    acks: list[uuid.UUID] | None = None,
) -> Beat:
    """A healthy runtime's steady beat, for tests that drive the heartbeat statement directly."""
    return Beat(
        workspace_id=workspace_id,
        token_hash=token_hash,
        health=Health.HEALTHY,
        error_rate=0.0,
        sample_error=sample_error,
        active_tasks=0,
        uptime_seconds=1.0,
        current_task="",
        monthly_spend=0.0,
        runtime_state="ok",
        observed_plugins=None,
        acks=acks or [],
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Workspace:
    id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)


@dataclass
class Registry:
    """The app under test, its database, and its settings."""

    client: AppClient
    db: asyncpg.Connection
    settings: Settings

    async def create_workspace(
        self, plugins: list[dict[str, str]] | None = None, **fields: Any
    ) -> Workspace:
        # Names are unique among live workspaces: each one gets its own unless the test names it.
        body = {"name": f"agent-{uuid.uuid4().hex[:12]}", "plugins": plugins or [], **fields}
        response = await self.client.post("/workspaces", json=body, headers=ADMIN)
        assert response.status == 201, await response.text()
        data = await response.json()
        return Workspace(data["workspace"]["id"], data["token"])

    async def heartbeat(self, workspace: Workspace, **fields: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/registry/heartbeat",
            json={"workspace_id": workspace.id, **fields},
            headers=workspace.auth,
        )
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result

    async def show(self, workspace: Workspace) -> dict[str, Any]:
        response = await self.client.get(f"/workspaces/{workspace.id}", headers=ADMIN)
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result

    async def set_status(self, workspace: Workspace, status: str) -> None:
        """Put a workspace in a status directly, along legal transitions (the database
        refuses others), as heartbeats, sweepers or operators would have."""
        current = Status(
            await self.db.fetchval(
                "SELECT status FROM all_workspaces WHERE id = $1", uuid.UUID(workspace.id)
            )
        )
        for step in legal_path(current, Status(status)):
            await self.db.execute(
                "UPDATE workspaces SET status = $2 WHERE id = $1",
                uuid.UUID(workspace.id),
                step.value,
            )

    async def reconciles(self, workspace: Workspace) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM reconciles WHERE workspace_id = $1 ORDER BY created_at",
            uuid.UUID(workspace.id),
        )

    async def settled(self, workspace: Workspace, within_s: float = 20.0) -> list[asyncpg.Record]:
        """Wait until the workspace has no reconcile running or due (a queued run scheduled
        well in the future, e.g. a `runtime_restarted` check minutes ahead, is not waited
        for); return all runs."""
        deadline = time.monotonic() + within_s
        while True:
            runs = await self.reconciles(workspace)
            if runs and all(not _pending(r) for r in runs):
                return runs
            assert time.monotonic() < deadline, f"reconciles did not settle: {runs}"
            await asyncio.sleep(0.05)


# A queued run due further ahead than this is a scheduled one, not work in progress.
SCHEDULED_AHEAD = timedelta(minutes=1)


def _pending(run: asyncpg.Record) -> bool:
    if run["status"] == "running":
        return True
    if run["status"] != "queued":
        return False
    due = run["next_attempt_at"]
    return due is None or due < datetime.now(UTC) + SCHEDULED_AHEAD


def legal_path(start: Status, goal: Status) -> list[Status]:
    """The shortest chain of legal transitions from start to goal (empty if equal)."""
    paths: dict[Status, list[Status]] = {start: []}
    frontier = [start]
    while frontier and goal not in paths:
        current = frontier.pop(0)
        for a, b in sorted(LEGAL_TRANSITIONS):
            if a is current and b not in paths:
                paths[b] = [*paths[current], b]
                frontier.append(b)
    return paths[goal]


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [
            "git",
            "-c",
            "user.email=test@example.com",
            "-c",
            "user.name=test",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def make_git_repo(path: Path, files: dict[str, str], branch: str = "main") -> str:
    """A local git repository with one commit of `files` on `branch`; returns its sha."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", branch)
    write_tree(path, files)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "plugin")
    return git(path, "rev-parse", "HEAD")


def read_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
