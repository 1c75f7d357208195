"""A fleet made through the API, as operators make one, and brought to its steady state the
way its runtimes bring it there (`python -m bench.heartbeat --fleet api`):

1. `POST /workspaces` with the admin token for each workspace, a bounded number at once, each
   declaring one or two plugins from local directories the bench writes (`file://` sources,
   allowlisted by `REGISTRY_PLUGIN_ALLOWLIST` of the registry it talks to);
2. right after, that runtime's first heartbeat (a box with no plugins yet): provisioning ->
   online, which queues its reconcile (so the fleet grows from an empty table with heartbeats
   and reconciles flowing, as a real one does);
3. wait until every reconcile has finished (none queued or running) and check they succeeded;
4. each runtime beats again and is handed the restart its reconcile asked for (to load the
   plugins it was given), restarts (its uptime goes down) and acknowledges it, now reporting
   the plugins it runs with the shas the registry recorded;
5. wait until nothing is queued or running and every plugins_sync mark has been judged.

What is left is what such a fleet leaves in the database: uuid7 ids in creation order, random
tokens, the events, runs, steps and actions of that history, and the table's bloat and
statistics as autovacuum left them (nothing here vacuums or analyses a registry table).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.fleet import Fleet, Member, Plugins, beat_body, varying_fields
from bench.registry_proc import ADMIN_TOKEN

PLUGINS = ("bench-alpha", "bench-beta")
# Uptimes before the restart are above this, those after it start again from 0: the drop is
# what tells the registry the box restarted.
UPTIME_BEFORE_RESTART = 86_400
# What the registry that builds the fleet needs besides the plugin settings: nobody goes offline
# or fails provisioning while a large fleet is still being made (the bench's registries
# measure with the same offline window), and reconciles run as many at once as its pool allows.
BUILDER_ENV = {
    "REGISTRY_OFFLINE_AFTER_S": "3600",
    "REGISTRY_PROVISION_TIMEOUT_S": "3600",
    "REGISTRY_RECONCILE_CONCURRENCY": "8",
}
DRAIN_POLL_S = 0.5


def plugin_source(work_dir: Path, name: str = "bench-plugin") -> Path:
    """A small local plugin: a manifest and a few files, as a directory under sources/."""
    source = work_dir / "sources" / name
    (source / "skills").mkdir(parents=True)
    (source / "plugin.json").write_text(f'{{"name": "{name}", "version": "1.0.0"}}\n')
    for i in range(5):
        (source / "skills" / f"skill-{i}.md").write_text(f"# skill {i}\n" + "text\n" * 50)
    return source


def registry_env(work_dir: Path) -> dict[str, str]:
    """The plugin settings of every registry serving the fleet: its sources allowed, its
    plugins installed under the bench's directory."""
    return {
        "REGISTRY_PLUGIN_ALLOWLIST": f"file://{work_dir / 'sources'}/",
        "REGISTRY_PLUGINS_DIR": str(work_dir / "plugins"),
    }


def declared(work_dir: Path, n: int) -> list[dict[str, str]]:
    """Workspace n's plugins: the first one, and every other workspace the second too."""
    names = PLUGINS if n % 2 == 0 else PLUGINS[:1]
    return [{"source": f"file://{work_dir / 'sources' / name}"} for name in names]


async def each(
    items: Iterable[int], connections: int, job: Callable[[int], Awaitable[None]]
) -> None:
    """`job(item)` for every item, `connections` at a time."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:  # one iterator: each item is taken by one worker
            await job(item)

    await asyncio.gather(*(worker() for _ in range(connections)))


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, token: str, expect: int
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as response:
        text = await response.read()
        if response.status != expect:
            raise RuntimeError(f"POST {url}: {response.status} {text[:500]!r}")
        answer: dict[str, Any] = orjson.loads(text)
        return answer


async def run_counts(conn: asyncpg.Connection) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'running')) AS pending,"
        " count(*) FILTER (WHERE status = 'failed') AS failed, count(*) AS runs,"
        " (SELECT count(*) FROM plugins_sync_dirty) AS marks FROM reconciles"
    )
    assert row is not None
    return row


async def drain(dsn: str, *, marks: bool, within_s: float) -> asyncpg.Record:
    """Until no reconcile is queued or running (and, with `marks`, no plugins_sync mark is
    left to judge); raises if a run failed."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within_s
        while True:
            counts = await run_counts(conn)
            if counts["pending"] == 0 and (not marks or counts["marks"] == 0):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"not drained within {within_s:.0f} s: {dict(counts)}")
            await asyncio.sleep(DRAIN_POLL_S)
        if counts["failed"]:
            errors = await conn.fetch(
                "SELECT DISTINCT error FROM reconciles WHERE status = 'failed' LIMIT 3"
            )
            raise RuntimeError(
                f"{counts['failed']} reconciles failed: {[e['error'] for e in errors]}"
            )
        return counts
    finally:
        await conn.close()


async def installed(dsn: str) -> dict[uuid.UUID, Plugins]:
    """What each workspace has installed, as its runtime reports it once restarted."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT workspace_id, name, sha FROM installed_plugins ORDER BY workspace_id, name"
        )
    finally:
        await conn.close()
    plugins: dict[uuid.UUID, Plugins] = {}
    for row in rows:
        plugins.setdefault(row["workspace_id"], []).append({"name": row["name"], "sha": row["sha"]})
    return plugins


def _say(what: str, count: int, started: float) -> None:
    elapsed = time.monotonic() - started
    print(f"api fleet: {what}: {count:,} in {elapsed:.1f} s ({count / elapsed:,.0f}/s)", flush=True)


async def build(url: str, dsn: str, work_dir: Path, size: int, *, connections: int = 16) -> Fleet:
    """Steps 1-5 of the module docstring against the registry at `url` (started with
    `registry_env(work_dir)` and BUILDER_ENV); returns the fleet as its runtimes now beat."""
    for name in PLUGINS:
        plugin_source(work_dir, name)
    ids: list[uuid.UUID] = [uuid.UUID(int=0)] * size
    tokens = [""] * size
    beat_url = f"{url}/registry/heartbeat"
    salt = f"{int(time.time()):x}"
    # Before the restart: a box that has been up a while, with no plugins yet (an empty list).
    before = Fleet(salt, size, epoch=int(time.time()), uptime_base=UPTIME_BEFORE_RESTART)

    def first_body(n: int) -> bytes:
        return beat_body(ids[n - 1], [], **varying_fields(before.uptime(n)))

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()

        # As in life, the runtime beats as soon as its workspace exists: the fleet grows with
        # heartbeats and reconciles flowing, from an empty table.
        async def create(n: int) -> None:
            body = {"name": f"bench-{salt}-{n}", "plugins": declared(work_dir, n)}
            made = await _post(session, f"{url}/workspaces", orjson.dumps(body), ADMIN_TOKEN, 201)
            ids[n - 1] = uuid.UUID(made["workspace"]["id"])
            tokens[n - 1] = made["token"]
            answer = await _post(session, beat_url, first_body(n), tokens[n - 1], 200)
            if answer["previous_status"] != "provisioning" or answer["status"] != "online":
                raise RuntimeError(f"first heartbeat of {ids[n - 1]}: {answer}")

        await each(range(1, size + 1), connections, create)
        _say(
            "created through POST /workspaces, each then beat online (a reconcile each)",
            size,
            started,
        )
        started = time.monotonic()
        counts = await drain(dsn, marks=False, within_s=max(600.0, size / 10))
        _say(f"reconciles drained ({counts['runs']:,} runs, none failed)", size, started)

        reports = await installed(dsn)
        fleet = Fleet.recorded(
            [Member(i, t, reports.get(i, [])) for i, t in zip(ids, tokens, strict=True)],
            epoch=int(time.time()),
            uptime_base=0,  # restarted: uptimes start again
        )
        handed_out = left = 0
        started = time.monotonic()

        async def restart(n: int) -> None:
            nonlocal handed_out, left
            answer = await _post(session, beat_url, first_body(n), tokens[n - 1], 200)
            actions = [a["id"] for a in answer["actions"]]
            handed_out += sum(a["type"] == "restart" for a in answer["actions"])
            # Restarted with the plugins it was given: uptime from 0, the actions acknowledged.
            body = beat_body(
                ids[n - 1], fleet.plugins(n), actions, **varying_fields(fleet.uptime(n))
            )
            answer = await _post(session, beat_url, body, tokens[n - 1], 200)
            left += len(answer["actions"])

        await each(range(1, size + 1), connections, restart)
        _say(
            f"restarts ({handed_out:,} handed out, restarted and acknowledged; "
            f"{left} actions still pending)",
            size,
            started,
        )
    started = time.monotonic()
    counts = await drain(dsn, marks=True, within_s=600.0)
    _say(f"settled ({counts['runs']:,} runs in all, no plugins_sync mark left)", size, started)
    return fleet
