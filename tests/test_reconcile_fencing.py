"""Leases fence reconciles: a run that lost its lease never writes, and never runs forever."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from registry.db import reconciles
from registry.db.reconciles import Finished, Outcome, RestartBudget
from registry.keys import RECONCILER
from tests.conftest import MakeRegistry
from tests.durability_support import plugin_runtime, wait_until
from tests.lock_support import connect, insert_workspace, wait_blocked_by
from tests.support import write_tree

BUDGET = RestartBudget(limit=3, window_s=3600.0)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await connect(dsn)
    yield connection
    await connection.close()


async def lapse(db: asyncpg.Connection, run_id: uuid.UUID) -> None:
    """The owner stalled past its lease (what waiting out the lease would do, at once)."""
    await db.execute(
        "UPDATE reconciles SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        run_id,
    )


async def test_a_stalled_owner_cannot_overwrite_the_new_owners_outcome(
    db: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """Mutant: LOCK_OWN_RUN/FINISH without `lease_owner = $2`: the loser's late write
    replaces the outcome of the owner that took the run over (or adds its event)."""
    workspace_id, _ = await insert_workspace(db, "online")
    run_id = await reconciles.queue_reconcile(conn, workspace_id, "manual")
    [first] = await reconciles.claim_due(conn, "one", 60.0, 1, [], 5)
    await lapse(db, run_id)
    [taken] = await reconciles.claim_due(conn, "two", 60.0, 1, [], 5)
    assert (first.id, taken.id, taken.attempt) == (run_id, run_id, 2)

    # While the new owner runs it, the loser's outcome and its retry are refused ...
    while_running = await reconciles.finish(
        conn, run_id, "one", Outcome("failed", "stalled"), budget=BUDGET
    )
    retried = await reconciles.retry_later(conn, run_id, "one", "stalled", 1.0)
    running = await db.fetchrow("SELECT status, lease_owner FROM reconciles WHERE id = $1", run_id)
    assert running is not None
    # ... and after the new owner wrote its outcome, too.
    won = await reconciles.finish(conn, run_id, "two", Outcome("succeeded", None), budget=BUDGET)
    late = await reconciles.finish(conn, run_id, "one", Outcome("failed", "stalled"), budget=BUDGET)

    assert (while_running, retried) == (Finished("lost"), False)
    assert tuple(running) == ("running", "two")
    assert (won.status, late) == ("succeeded", Finished("lost"))
    row = await db.fetchrow(
        "SELECT status, error, finished_at FROM reconciles WHERE id = $1", run_id
    )
    assert row is not None
    assert (row["status"], row["error"]) == ("succeeded", None)
    causes = await db.fetch(
        "SELECT cause FROM workspace_events WHERE kind = 'reconcile' ORDER BY id"
    )
    assert [c["cause"] for c in causes] == ["reconcile_succeeded"]


async def test_a_run_whose_terminal_write_keeps_failing_ends_failed_at_max_attempts(
    make_registry: MakeRegistry, plugin_sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug: finish() raised, the run stayed `running` until its lease lapsed and was then
    taken over with no attempt check (8 attempts with a limit of 5). The takeover path
    counts attempts like the retry path: at the limit the run ends failed, with its event."""

    async def terminal_write_fails(*args: object, **kwargs: object) -> Finished:
        raise RuntimeError("terminal write failed")

    registry = await make_registry(reconcile_max_attempts=3)
    worker = registry.client.app[RECONCILER]
    plugin = write_tree(plugin_sources / "p", {"plugin.py": "print('p')\n"})
    workspace = await registry.create_workspace([{"source": f"file://{plugin}"}])
    monkeypatch.setattr(reconciles, "finish", terminal_write_fails)
    await registry.heartbeat(workspace)

    async def describe() -> str:
        return str([dict(r) for r in await registry.reconciles(workspace)])

    for attempt in (1, 2, 3):

        async def attempt_over(attempt: int = attempt) -> bool:
            [run] = await registry.reconciles(workspace)
            return bool(run["attempt"] == attempt and run["id"] not in worker.running)

        await wait_until(attempt_over, 20, describe)
        [run] = await registry.reconciles(workspace)
        assert run["status"] == "running"  # nobody wrote its outcome
        await lapse(registry.db, run["id"])

    async def ended() -> bool:
        return bool((await registry.reconciles(workspace))[0]["status"] == "failed")

    await wait_until(ended, 20, describe)
    [run] = await registry.reconciles(workspace)
    assert run["attempt"] == 3
    assert run["error"].startswith("gave up after 3 attempts"), run["error"]
    assert run["lease_owner"] is None
    events = await registry.db.fetch(
        "SELECT detail FROM workspace_events WHERE cause = 'reconcile_failed' "
        "AND workspace_id = $1",
        uuid.UUID(workspace.id),
    )
    assert len(events) == 1


async def test_a_run_whose_lease_renewal_stalls_for_a_whole_lease_is_stopped_here(
    make_registry: MakeRegistry, dsn: str, plugin_sources: Path
) -> None:
    """Mutant: no fencing. The renewal hangs (here: on a lock; in life: a dead connection, an
    exhausted pool) for longer than the lease: another process may take the run over by now,
    so this one must stop its copy at once, not when the query times out (30 s here) or
    never. Then the run is handed back and completes, on its second attempt."""
    registry = await make_registry(reconcile_lease_s=1.5)
    worker = registry.client.app[RECONCILER]
    plugin = write_tree(plugin_sources / "p", {"plugin.py": "print('p')\n"})
    async with plugin_runtime(hold_first=1) as runtime:
        workspace = await registry.create_workspace(
            [{"source": f"file://{plugin}"}], delivery="http", url=runtime.url
        )
        await registry.heartbeat(workspace, plugins=[])
        await runtime.wait_for_puts(1)
        [run] = await registry.reconciles(workspace)
        assert run["id"] in worker.running

        async def stopped() -> bool:
            return run["id"] not in worker.running

        async def describe() -> str:
            return str([dict(r) for r in await registry.reconciles(workspace)])

        staller = await connect(dsn)
        try:
            stall = staller.transaction()
            await stall.start()
            await staller.execute("SELECT 1 FROM reconciles WHERE id = $1 FOR UPDATE", run["id"])
            await wait_until(stopped, 10, describe)
            await stall.rollback()
        finally:
            await staller.close()
        runs = await registry.settled(workspace)

    assert [(r["id"], r["status"], r["attempt"]) for r in runs] == [(run["id"], "succeeded", 2)]
    assert [p.held for p in runtime.puts] == [True, False]


async def test_closing_the_scheduler_while_a_run_writes_its_outcome_hands_the_run_back(
    make_registry: MakeRegistry, dsn: str, plugin_sources: Path
) -> None:
    """The bug: aiojobs 1.4's close() cancels shielded jobs too, so a run writing its outcome
    when the scheduler closed lost that write and stayed `running` under the lease of a
    process that had gone. Closed mid-write, the run must end terminal or be handed back as
    queued, with nobody's lease on it."""
    registry = await make_registry(
        reconcile_lease_s=60.0, reconcile_poll_s=20.0, shutdown_grace_s=0.1
    )
    plugin = write_tree(plugin_sources / "p", {"plugin.py": "print('p')\n"})
    holder = await connect(dsn)
    try:
        async with plugin_runtime(hold_first=1) as runtime:
            workspace = await registry.create_workspace(
                [{"source": f"file://{plugin}"}], delivery="http", url=runtime.url
            )
            await registry.heartbeat(workspace, plugins=[])
            await runtime.wait_for_puts(1)
            # Only the terminal write touches workspace_actions (it asks for a restart): held
            # here, the run stops in the middle of writing its outcome.
            barrier = holder.transaction()
            await barrier.start()
            await holder.execute("LOCK TABLE workspace_actions IN EXCLUSIVE MODE")
            runtime.release()
            await wait_blocked_by(registry.db, holder)
            [run] = await registry.reconciles(workspace)
            assert run["status"] == "running"

            closing = asyncio.ensure_future(registry.client.close())

            async def handed_back() -> bool:
                [run] = await registry.reconciles(workspace)
                return bool(run["status"] != "running")

            async def describe() -> str:
                return str([dict(r) for r in await registry.reconciles(workspace)])

            try:
                await wait_until(handed_back, 20, describe)
            finally:
                await barrier.rollback()
                await asyncio.wait_for(closing, 30)
    finally:
        await holder.close()

    [after] = await registry.reconciles(workspace)
    assert after["status"] in ("queued", "succeeded", "failed"), dict(after)
    assert after["lease_owner"] is None


async def test_renewal_tells_a_run_that_just_ended_from_one_taken_over(
    db: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """A single process used to log "its lease was taken over" for runs that had just
    succeeded: renewal saw them no longer held and took that for a takeover."""
    ended_workspace, _ = await insert_workspace(db, "online")
    taken_workspace, _ = await insert_workspace(db, "online")
    ended = await reconciles.queue_reconcile(conn, ended_workspace, "manual")
    taken = await reconciles.queue_reconcile(conn, taken_workspace, "manual")
    claims = await reconciles.claim_due(conn, "one", 60.0, 2, [], 5)
    assert {c.id for c in claims} == {ended, taken}
    await reconciles.finish(conn, ended, "one", Outcome("succeeded", None), budget=BUDGET)
    await lapse(db, taken)
    [retaken] = await reconciles.claim_due(conn, "two", 60.0, 1, [], 5)
    assert retaken.id == taken

    leases = await reconciles.renew_leases(conn, "one", 60.0, [ended, taken])

    assert (leases.held, leases.taken) == (set(), {taken})


async def test_a_run_that_just_ended_is_neither_stopped_nor_reported_lost(
    make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registry = await make_registry()
    worker = registry.client.app[RECONCILER]
    workspace_id, _ = await insert_workspace(registry.db, "online")
    run_id = await reconciles.queue_reconcile(registry.db, workspace_id, "manual")
    # Claimed by this process, then its outcome written, while its job has not returned yet.
    await registry.db.execute(
        "UPDATE reconciles SET status = 'succeeded', finished_at = now() WHERE id = $1", run_id
    )
    finishing = asyncio.Event()

    async def still_returning() -> None:
        await finishing.wait()

    job = await worker._scheduler.spawn(still_returning())
    worker._jobs[run_id] = job
    caplog.set_level("WARNING", logger="registry.reconcile.worker")

    await worker._renew()

    assert not job.closed
    assert [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()] == []
    finishing.set()
    await job.wait()
    worker._jobs.pop(run_id, None)
