"""The stored plugins_sync (workspaces.plugins_sync) equals the derived one, whoever writes.

A property-style test drives a few workspaces through generated sequences of the writers that
change what the derivation reads (the registry's own db functions where they exist, plain SQL
for the heartbeat's parts), and after every step checks that judging the marked workspaces
again (registry/sync_state.py) leaves every stored value equal to `recorded_sync` of the state
read afresh: a writer whose change the database did not mark would leave a stale value. Then
the heartbeat's hot path (a report that did not change marks nothing), and the list filters
with stored values not judged yet, and with a source the allowlist refuses now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from registry import sync_state
from registry.db import actions, reconciles, workspaces
from registry.db.pool import init_connection
from registry.db.workspaces import DeclaredPlugin
from registry.verdicts import Liveness, Recorded, recorded_sync
from tests import lock_support
from tests.conftest import MakeRegistry
from tests.support import ADMIN, Registry, write_tree

OWNER = "test-owner"
BUDGET = reconciles.RestartBudget(limit=2, window_s=3600.0)
SOURCES = ("file:///srv/plugins/a", "file:///srv/plugins/b", "file:///srv/plugins/c")


async def _derived(conn: asyncpg.Connection, workspace_id: uuid.UUID) -> str:
    """recorded_sync of the state as read now, the way a view reads it."""
    workspace = await workspaces.get_workspace(conn, workspace_id)
    assert workspace is not None
    state = Recorded(
        workspace,
        declared=await workspaces.declared_plugins(conn, workspace_id),
        installed=await workspaces.installed_plugins(conn, workspace_id),
        last=await reconciles.last_reconcile(conn, workspace_id),
        liveness=Liveness(90.0, 600.0),
        now=workspace.created_at,
        pending=await actions.pending_actions(conn, workspace_id),
    )
    return recorded_sync(state).value


async def _stored(conn: asyncpg.Connection, workspace_id: uuid.UUID) -> str | None:
    value = await conn.fetchval("SELECT plugins_sync FROM workspaces WHERE id = $1", workspace_id)
    return value if isinstance(value, str) else None


Step = Callable[[asyncpg.Connection, uuid.UUID, random.Random], Awaitable[str]]


async def _declare(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    chosen = rnd.sample(SOURCES, rnd.randint(0, len(SOURCES)))
    plugins = [DeclaredPlugin(s.rsplit("/", 1)[1], s) for s in chosen]
    async with conn.transaction():
        await workspaces.replace_declared(conn, w, plugins)
        await reconciles.queue_reconcile(conn, w, "declared_changed")
    return f"declare {chosen}"


async def _install(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    source = rnd.choice(SOURCES)
    name = source.rsplit("/", 1)[1]
    if rnd.random() < 0.3:
        source += "-moved"  # installed from another source than declared
    await workspaces.record_installed(conn, w, name, source, rnd.choice(["s1", "s2"]))
    return f"install {name} from {source}"


async def _forget(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    name = rnd.choice(SOURCES).rsplit("/", 1)[1]
    await workspaces.forget_installed(conn, w, name)
    return f"forget {name}"


async def _queue(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    await reconciles.queue_reconcile(conn, w, "manual", refresh=rnd.random() < 0.5)
    return "queue"


async def _claim(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    claims = await reconciles.claim_due(conn, OWNER, 60.0, 10, [], 5)
    return f"claim {len(claims)}"


async def _running(conn: asyncpg.Connection, w: uuid.UUID) -> uuid.UUID | None:
    value = await conn.fetchval(
        "SELECT id FROM reconciles WHERE workspace_id = $1 AND status = 'running'", w
    )
    return value if isinstance(value, uuid.UUID) else None


async def _finish(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    run = await _running(conn, w)
    if run is None:
        return "finish: none running"
    if rnd.random() < 0.5:
        # A step that changed the box: the finish asks for a restart (or withholds it).
        await reconciles.insert_step(
            conn, run, reconciles.StepDone("a", "install", "succeeded", SOURCES[0], "s1", 0.1, None)
        )
    status = rnd.choice(["succeeded", "failed"])
    outcome = reconciles.Outcome(status, None if status == "succeeded" else "fetch failed")
    finished = await reconciles.finish(conn, run, OWNER, outcome, budget=BUDGET)
    return f"finish {finished}"


async def _retry(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    run = await _running(conn, w)
    if run is None:
        return "retry: none running"
    return f"retry {await reconciles.retry_later(conn, run, OWNER, 'busy', 0.0)}"


async def _release(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    return f"release {await reconciles.release_all(conn, OWNER)}"


async def _cancel(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    await reconciles.cancel_queued(conn, w, "removed")
    return "cancel"


async def _report(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    """What a heartbeat writes: the runtime's report of its plugins (or none)."""
    report = rnd.choice(
        [
            None,
            [],
            [{"name": "a", "sha": "s1"}],
            [{"name": "a", "sha": "s2"}, {"name": "b", "sha": "s1"}],
            [{"name": "a", "sha": "s1"}, {"name": "b", "sha": "s1"}, {"name": "c", "sha": "s1"}],
        ]
    )
    if report is None:
        await conn.execute("DELETE FROM reported_plugins WHERE workspace_id = $1", w)
    else:
        await conn.execute(
            "INSERT INTO reported_plugins (workspace_id, plugins, changed_at) "
            "VALUES ($1, $2, now()) "
            "ON CONFLICT (workspace_id) DO UPDATE SET plugins = EXCLUDED.plugins",
            w,
            report,
        )
    return f"report {report}"


async def _ack(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    """What a heartbeat that acknowledges its restart writes."""
    await conn.execute(
        "UPDATE workspace_actions SET acked_at = now() "
        "WHERE workspace_id = $1 AND acked_at IS NULL",
        w,
    )
    return "ack"


async def _withhold(conn: asyncpg.Connection, w: uuid.UUID, rnd: random.Random) -> str:
    await conn.execute(
        "UPDATE reconciles SET restart_withheld = NOT restart_withheld WHERE id = "
        "(SELECT id FROM reconciles WHERE workspace_id = $1 ORDER BY created_at DESC LIMIT 1)",
        w,
    )
    return "toggle withheld"


STEPS: list[Step] = [
    _declare,
    _install,
    _install,
    _forget,
    _queue,
    _claim,
    _claim,
    _finish,
    _finish,
    _retry,
    _release,
    _cancel,
    _report,
    _report,
    _ack,
    _withhold,
]


@pytest.fixture
async def conn(db: asyncpg.Connection) -> asyncpg.Connection:
    await init_connection(db)  # the registry's codecs (jsonb as Python values)
    return db


async def _create(conn: asyncpg.Connection, plugins: list[DeclaredPlugin]) -> uuid.UUID:
    workspace = await workspaces.create_workspace(
        conn,
        name=f"ws-{uuid.uuid4().hex[:8]}",
        token_hash=uuid.uuid4().bytes,
        delivery="filesystem",
        url=None,
        plugins=plugins,
        actor="test",
    )
    return workspace.id


@pytest.mark.parametrize("seed", range(6))
async def test_the_stored_plugins_sync_equals_the_derived_one_after_every_write(
    conn: asyncpg.Connection, seed: int
) -> None:
    rnd = random.Random(seed)
    fleet = [await _create(conn, [DeclaredPlugin("a", SOURCES[0])]), await _create(conn, [])]
    await sync_state.refresh(conn)
    seen = set()
    history: list[str] = []
    for _ in range(60):
        workspace = rnd.choice(fleet)
        history.append(await rnd.choice(STEPS)(conn, workspace, rnd))
        await sync_state.refresh(conn)
        for w in fleet:
            derived = await _derived(conn, w)
            seen.add(derived)
            assert await _stored(conn, w) == derived, history
        assert await conn.fetchval("SELECT count(*) FROM plugins_sync_dirty") == 0
    assert len(seen) >= 3, f"the sequence reached only {seen}"


async def test_a_write_the_database_did_not_mark_would_be_missed(conn: asyncpg.Connection) -> None:
    # The mechanism is the marks: with the trigger off, the stored value goes stale.
    workspace = await _create(conn, [DeclaredPlugin("a", SOURCES[0])])
    await sync_state.refresh(conn)
    assert await _stored(conn, workspace) == "out_of_sync"
    await conn.execute("ALTER TABLE installed_plugins DISABLE TRIGGER installed_plugins_sync")
    try:
        await workspaces.record_installed(conn, workspace, "a", SOURCES[0], "s1")
        await sync_state.refresh(conn)
        assert await _derived(conn, workspace) == "synced"
        assert await _stored(conn, workspace) == "out_of_sync"
    finally:
        await conn.execute("ALTER TABLE installed_plugins ENABLE TRIGGER installed_plugins_sync")


async def _marks(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval("SELECT count(*) FROM plugins_sync_dirty")
    assert isinstance(value, int)
    return value


async def test_a_heartbeat_that_reports_what_it_reported_before_marks_nothing(
    registry: Registry, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "seo", {"plugin.py": "print('seo')\n"})
    workspace = await registry.create_workspace([{"source": f"file://{plugin}"}])
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    report = [{"name": "seo", "sha": "whatever"}]
    await registry.heartbeat(workspace, plugins=report)
    async with _refresher_held(registry):
        before = await _marks(registry.db)
        for _ in range(3):
            await registry.heartbeat(workspace, plugins=report)
        assert await _marks(registry.db) == before
        await registry.heartbeat(workspace, plugins=[])
        assert await _marks(registry.db) == before + 1


@contextlib.asynccontextmanager
async def _refresher_held(registry: Registry) -> AsyncIterator[None]:
    """Holds the refresher's lock, so marks stay until the test lets go."""
    await registry.db.execute("SELECT pg_advisory_lock($1)", sync_state.REFRESH_LOCK_KEY)
    try:
        yield
    finally:
        await registry.db.execute("SELECT pg_advisory_unlock($1)", sync_state.REFRESH_LOCK_KEY)


async def _names(registry: Registry, query: str) -> set[str]:
    response = await registry.client.get(f"/workspaces?{query}", headers=ADMIN)
    assert response.status == 200, await response.text()
    return {w["name"] for w in (await response.json())["workspaces"]}


async def test_the_filters_judge_workspaces_changed_since_their_value_was_stored(
    registry: Registry,
) -> None:
    a = await registry.create_workspace(name="a")
    b = await registry.create_workspace(name="b")
    await sync_state.refresh(registry.db)
    assert await _names(registry, "plugins_sync=synced") == {"a", "b"}
    async with _refresher_held(registry):
        # b's latest run failed; its stored value still says synced until it is judged again.
        await registry.db.execute(
            "INSERT INTO reconciles (workspace_id, trigger, status, finished_at, error) "
            "VALUES ($1, 'manual', 'failed', now(), 'boom')",
            uuid.UUID(b.id),
        )
        assert await _stored(registry.db, uuid.UUID(b.id)) == "synced"
        assert await _names(registry, "plugins_sync=failed") == {"b"}
        assert await _names(registry, "plugins_sync=synced") == {"a"}
    await sync_state.refresh(registry.db)
    assert await _stored(registry.db, uuid.UUID(b.id)) == "failed"
    assert await _stored(registry.db, uuid.UUID(a.id)) == "synced"


async def test_a_source_the_allowlist_refuses_now_is_out_of_sync_in_the_filters(
    make_registry: MakeRegistry, plugin_sources: Path
) -> None:
    plugin = write_tree(plugin_sources / "seo", {"plugin.py": "print('seo')\n"})
    before = await make_registry()
    workspace = await before.create_workspace([{"source": f"file://{plugin}"}], name="seo")
    await before.create_workspace(name="plain")
    await before.heartbeat(workspace)
    await before.settled(workspace)
    actions_ = (await before.heartbeat(workspace))["actions"]
    await before.heartbeat(workspace, acks=[a["id"] for a in actions_])
    await sync_state.refresh(before.db)
    assert await _names(before, "plugins_sync=synced") == {"seo", "plain"}
    await before.client.close()

    # Restarted with a tightened allowlist: stored, it is synced; this process refuses it.
    registry = await make_registry(plugin_allowlist=("file:///srv/elsewhere/",))
    await sync_state.refresh(registry.db)
    assert await _stored(registry.db, uuid.UUID(workspace.id)) == "synced"
    assert await _names(registry, "plugins_sync=out_of_sync") == {"seo"}
    assert await _names(registry, "plugins_sync=synced") == {"plain"}


async def test_a_refresh_waits_for_one_under_way_so_an_older_judgement_never_lands_last(
    conn: asyncpg.Connection, dsn: str
) -> None:
    workspace = await _create(conn, [DeclaredPlugin("a", SOURCES[0])])
    await sync_state.refresh(conn)
    await workspaces.record_installed(conn, workspace, "a", SOURCES[0], "s1")  # now synced
    first, second, holder = [await lock_support.connect(dsn) for _ in range(3)]
    try:
        # The first refresh judges "synced" and is held at its write by a row lock.
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM workspaces WHERE id = $1 FOR NO KEY UPDATE", workspace)
        one = asyncio.create_task(sync_state.refresh(first))
        await lock_support.wait_blocked(conn, first)
        # Meanwhile the plugin is gone again: marked, out_of_sync.
        await workspaces.forget_installed(conn, workspace, "a")
        two = asyncio.create_task(sync_state.refresh(second))
        await _wait_for_the_refresh_lock(conn, second)
        await holding.rollback()
        await asyncio.gather(one, two)
    finally:
        for c in (first, second, holder):
            await c.close()
    assert await _derived(conn, workspace) == "out_of_sync"
    assert await _stored(conn, workspace) == "out_of_sync"


async def _wait_for_the_refresh_lock(
    observer: asyncpg.Connection, waiting: asyncpg.Connection
) -> None:
    pid = waiting.get_server_pid()
    async with asyncio.timeout(lock_support.BLOCKED_WITHIN_S):
        while not await observer.fetchval(
            "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            await asyncio.sleep(0.01)


async def test_a_scrape_does_not_wait_on_another_process_judging(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """/metrics judges what changed before it counts, under the refresher's lock. Another
    process holding that lock (judging a large batch, or stalled) must not hold the scrape:
    past its query timeout it counts what is stored. Without the lock timeout the scrape
    waits for as long as the lock is held (here, for ever)."""
    await registry.create_workspace(name="a")
    async with _refresher_held(registry):
        with caplog.at_level(logging.INFO, logger="registry.sync_state"):
            async with asyncio.timeout(60):
                response = await registry.client.get("/metrics")
        assert response.status == 200
        assert "registry_workspaces{" in await response.text()
    assert any("plugins_sync not judged" in r.getMessage() for r in caplog.records)
