"""Property test: any sequence of heartbeats, sweeps and operator actions keeps the rules."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.db import transitions
from registry.db.heartbeats import Beat, apply_beat
from registry.db.pool import init_connection
from registry.liveness import SweepPolicy, sweep
from registry.statuses import LEGAL_TRANSITIONS, Status, classify_heartbeat

TOKEN = b"t" * 32

Op = tuple[str, float | None, str | None]

heartbeat = st.tuples(
    st.just("heartbeat"),
    st.sampled_from([0.0, 0.05, 0.3, 0.7]),
    st.sampled_from(["ok", "wedged"]),
)
operator = st.tuples(st.sampled_from(["pause", "resume", "remove"]), st.none(), st.none())
sweeps = st.tuples(st.sampled_from(["sweep_offline", "sweep_failed"]), st.none(), st.none())
operations = st.lists(st.one_of(heartbeat, operator, sweeps), min_size=1, max_size=25)

# Sweeps that judge everything silent, so that they always have something to do.
EXPIRE_ALL = SweepPolicy(
    offline_after_s=-1.0,
    provision_timeout_s=1e9,
    mass_expiry_share=1.0,
    mass_expiry_min_fleet=10**9,
    mass_expiry_rate=1.0,
)
FAIL_ALL = SweepPolicy(
    offline_after_s=1e9,
    provision_timeout_s=-1.0,
    mass_expiry_share=1.0,
    mass_expiry_min_fleet=10**9,
    mass_expiry_rate=1.0,
)


async def apply(conn: asyncpg.Connection, workspace_id: uuid.UUID, op: Op) -> None:
    kind, error_rate, runtime_state = op
    if kind == "heartbeat":
        assert error_rate is not None and runtime_state is not None
        result = await apply_beat(
            conn,
            Beat(
                workspace_id=workspace_id,
                token_hash=TOKEN,
                health=classify_heartbeat(error_rate, runtime_state),
                error_rate=error_rate,
                sample_error="",
                active_tasks=0,
                uptime_seconds=1.0,
                current_task="",
                monthly_spend=0.0,
                runtime_state=runtime_state,
                observed_plugins=None,
                acks=[],
            ),
        )
        if result.previous_status in (Status.PAUSED, Status.REMOVED):
            assert result.status in (None, result.previous_status)  # never promoted
    elif kind == "sweep_offline":
        await sweep(conn, EXPIRE_ALL)
    elif kind == "sweep_failed":
        await sweep(conn, FAIL_ALL)
    else:
        target = {"pause": Status.PAUSED, "resume": Status.OFFLINE, "remove": Status.REMOVED}
        only = frozenset({Status.PAUSED}) if kind == "resume" else None
        async with conn.transaction():
            await transitions.transition(
                conn, workspace_id, target[kind], cause=kind, actor="admin", only_from=only
            )


async def scenario(dsn: str, ops: list[Op]) -> None:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        await conn.execute(
            "TRUNCATE workspaces, removed_workspaces, workspace_events, reconciles CASCADE"
        )
        workspace_id = await conn.fetchval(
            "INSERT INTO workspaces (name, token_hash) "
            "VALUES ('w-' || gen_random_uuid(), $1) RETURNING id",
            TOKEN,
        )
        statuses = [Status.PROVISIONING]
        for op in ops:
            await apply(conn, workspace_id, op)
            now = Status(await conn.fetchval("SELECT status FROM all_workspaces"))
            if now is not statuses[-1]:
                statuses.append(now)
        events = await conn.fetch(
            "SELECT from_status, to_status FROM workspace_events WHERE kind = 'status' ORDER BY id"
        )
    finally:
        await conn.close()
    chain = [(Status(e["from_status"]), Status(e["to_status"])) for e in events]
    # Only legal transitions, each recorded by exactly one event, in order.
    assert all(pair in LEGAL_TRANSITIONS for pair in chain)
    assert chain == list(itertools.pairwise(statuses))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_any_sequence_of_writers_keeps_the_status_rules(dsn: str, ops: list[Op]) -> None:
    asyncio.run(scenario(dsn, ops))
