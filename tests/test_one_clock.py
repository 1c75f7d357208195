"""One clock: with the registry host's clock 600 s off the database's, every age and timestamp
a view shows still comes from the database's clock (registry/db/clock.py).

The database's clock cannot be moved from a test, so the registry's is: every `datetime` the
registry's modules see runs 600 s ahead. That is the same skew seen from the other side.
"""

from __future__ import annotations

import re
import sys
import uuid
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

import pytest

from registry.keys import REFUSALS
from tests.support import Registry, write_tree

SKEW = timedelta(seconds=600)
# Far below the skew, far above anything a slow machine adds between two statements.
CLOSE = timedelta(seconds=60)


class _AheadDatetime(datetime):
    """`datetime` on a host whose clock runs SKEW ahead of the database's."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _AheadDatetime:
        real = datetime.now(tz) + SKEW
        return cls.fromtimestamp(real.timestamp(), tz)


@pytest.fixture
def host_clock_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registry module that reads the wall clock through `datetime` reads it skewed."""
    patched = 0
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "registry" and getattr(module, "datetime", None) is datetime:
            monkeypatch.setattr(module, "datetime", _AheadDatetime)
            patched += 1
    assert patched, "no registry module imports datetime: the fixture skews nothing"


async def _db_now(registry: Registry) -> datetime:
    now: datetime = await registry.db.fetchval("SELECT clock_timestamp()")
    return now


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.usefixtures("host_clock_ahead")
async def test_why_right_after_creation_counts_from_the_database_clock(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()

    why = (await registry.show(workspace))["why"]

    created = re.search(r"created (\d+) s ago", why)
    assert created is not None, why
    assert int(created.group(1)) < CLOSE.total_seconds()


@pytest.mark.usefixtures("host_clock_ahead")
async def test_steps_and_pending_actions_are_timed_by_the_database_clock(
    registry: Registry, plugin_sources: Path
) -> None:
    source = f"file://{write_tree(plugin_sources / 'p', {'plugin.py': 'print(1)'})}"
    workspace = await registry.create_workspace([{"source": source}])
    before = await _db_now(registry)
    await registry.heartbeat(workspace, uptime_seconds=100.0)
    await registry.settled(workspace)
    after = await _db_now(registry)

    shown = await registry.show(workspace)
    [step] = shown["last_reconcile"]["steps"]
    [restart] = shown["pending_actions"]

    assert step["action"] == "install"
    assert before <= _at(step["started_at"]) <= _at(step["finished_at"]) <= after
    assert restart["age_s"] < CLOSE.total_seconds()
    assert re.search(r"asked \d s ago", shown["why"]), shown["why"]


@pytest.mark.usefixtures("host_clock_ahead")
async def test_a_refusal_is_stamped_by_the_database_clock(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    response = await registry.client.post(
        "/registry/heartbeat",
        json={"workspace_id": workspace.id, "error_rate": 7},
        headers=workspace.auth,
    )
    assert response.status == 400
    before = await _db_now(registry)
    await registry.client.app[REFUSALS].flush(registry.db)

    shown = await registry.show(workspace)
    refusal = shown["last_refusal"]

    # Stamped when it was refused (just before the flush), on the database's clock.
    assert before - CLOSE < _at(refusal["at"]) <= await _db_now(registry)
    assert re.search(r"last \d s ago, 1 times", shown["why"]), shown["why"]


@pytest.mark.usefixtures("host_clock_ahead")
async def test_a_listed_page_is_judged_by_the_database_clock(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    # Silent for 2 s by the database's clock: within any window. A page judged by a clock
    # 600 s ahead would call it silent for 602 s.
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    await registry.db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '2 s' WHERE id = $1",
        uuid.UUID(workspace.id),
    )

    response = await registry.client.get(
        "/workspaces", headers={"Authorization": f"Bearer {registry.settings.admin_token}"}
    )
    [listed] = (await response.json())["workspaces"]

    assert (listed["id"], listed["ready"]) == (workspace.id, True)
