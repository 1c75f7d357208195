"""A simulated clock for the liveness sweeper: seconds pass in the database, not in the test.

The database's now() stays real; advancing the clock moves every timestamp the sweeper and the
guard read that much into the past, which is the same to every statement that compares them
with now(). A heartbeat written now() is then a beat at the simulated present. `monotonic` is
the clock for the process's own start-up grace (LivenessSweeper(clock=...)).

Real time still passes meanwhile, and it would age every timestamp too: on a loaded machine a
scenario's 66 simulated seconds took minutes, and a runtime backing off 16 simulated seconds
looked silent for a minute. So each advance moves timestamps by the simulated seconds minus
the real seconds that passed since the previous one (measured on the database's clock): at
every advance, each age is exactly its simulated age, however slow the machine. Only the real
time within one step (between an advance and the sweep after it) is left, and it does not add
up; scenarios keep their events off the exact deadlines for it.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

AGE_WORKSPACES = """
UPDATE workspaces SET
    last_heartbeat_at = last_heartbeat_at - make_interval(secs => $1),
    status_changed_at = status_changed_at - make_interval(secs => $1)
WHERE status <> 'removed'
"""
AGE_EXPIRATIONS = "UPDATE fleet_expirations SET at = at - make_interval(secs => $1)"
AGE_GUARD = """
UPDATE fleet_guard SET
    since = since - make_interval(secs => $1),
    updated_at = updated_at - make_interval(secs => $1),
    silence_counted_from = silence_counted_from - make_interval(secs => $1),
    silent_changed_at = silent_changed_at - make_interval(secs => $1),
    released_at = released_at - make_interval(secs => $1)
"""


class SimClock:
    def __init__(self, db: asyncpg.Connection) -> None:
        self._db = db
        self.now = 0.0  # simulated seconds since the scenario began
        self.last_advance: datetime | None = None  # on the database's clock

    def monotonic(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        async with self._db.transaction():
            real_now: datetime = await self._db.fetchval("SELECT clock_timestamp()")
            passed = (real_now - (self.last_advance or real_now)).total_seconds()
            self.last_advance = real_now
            for statement in (AGE_WORKSPACES, AGE_EXPIRATIONS, AGE_GUARD):
                await self._db.execute(statement, seconds - passed)
        self.now += seconds
