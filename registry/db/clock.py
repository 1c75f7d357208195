"""The one clock: the database's. Ages in views are measured against it, never this host's.

Every timestamp the registry records (status changes, heartbeats, reconciles, steps,
refusals, events) is stamped by PostgreSQL's clock. Measuring their ages against the
registry host's clock would show the skew between the two hosts as time passed ("created
600 s ago" right after a create, on a host 600 s ahead), so a view reads the database's time
after it has read its data: no timestamp it shows is later than the `now` it is judged at.
"""

from __future__ import annotations

from datetime import datetime

from registry.db import Connection

# clock_timestamp(), not now(): inside a transaction now() is when it began, which may be
# before rows that other transactions committed and this one then read.
DB_NOW = "SELECT clock_timestamp()"


async def db_now(conn: Connection) -> datetime:
    now: datetime = await conn.fetchval(DB_NOW)
    return now
