"""The status rules: heartbeat targets stay within the legal transition table."""

from __future__ import annotations

import asyncpg
import pytest

from registry.statuses import (
    HEARTBEAT_TABLES,
    LEGAL_TRANSITIONS,
    Health,
    Status,
    classify_heartbeat,
    heartbeat_target,
)


@pytest.mark.parametrize(
    ("error_rate", "runtime_state", "health"),
    [
        (0.0, "ok", Health.HEALTHY),
        (0.099, "ok", Health.HEALTHY),
        (0.1, "ok", Health.UNWELL),
        (0.499, "ok", Health.UNWELL),
        (0.5, "ok", Health.DEGRADED),
        (0.0, "wedged", Health.DEGRADED),
    ],
)
def test_classify_heartbeat(error_rate: float, runtime_state: str, health: Health) -> None:
    assert classify_heartbeat(error_rate, runtime_state) is health


def test_every_heartbeat_change_is_a_legal_transition() -> None:
    for health in Health:
        for previous in Status:
            target = heartbeat_target(previous, health)
            assert target == previous or (previous, target) in LEGAL_TRANSITIONS


def test_paused_and_removed_are_never_promoted() -> None:
    for health in Health:
        for held in (Status.PAUSED, Status.REMOVED):
            assert heartbeat_target(held, health) is held
            assert held.value not in HEARTBEAT_TABLES[health].from_statuses


def test_tables_hold_only_changes() -> None:
    for table in HEARTBEAT_TABLES.values():
        pairs = list(zip(table.from_statuses, table.to_statuses, strict=True))
        assert all(a != b for a, b in pairs)


async def test_database_enforces_the_same_transition_table(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT from_status, to_status FROM status_transitions")

    assert {(Status(r["from_status"]), Status(r["to_status"])) for r in rows} == LEGAL_TRANSITIONS


async def test_database_refuses_an_illegal_transition_from_any_writer(
    db: asyncpg.Connection,
) -> None:
    workspace_id = await db.fetchval(
        "INSERT INTO workspaces (name, token_hash) "
        "VALUES ('w-' || gen_random_uuid(), 'x') RETURNING id"
    )

    with pytest.raises(asyncpg.CheckViolationError, match="illegal status transition"):
        await db.execute("UPDATE workspaces SET status = 'offline' WHERE id = $1", workspace_id)

    assert await db.fetchval("SELECT status FROM workspaces WHERE id = $1", workspace_id) == (
        "provisioning"
    )
