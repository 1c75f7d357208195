"""A synthetic fleet: N workspaces whose ids and tokens are derived from (salt, n).

Deriving both from the index lets three parties agree on the fleet without shipping a list:
the seeding SQL, the pgbench script (which can only draw a random integer) and the Python
load generator. wrk cannot compute md5, so it reads a file written by `write_file`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson

from registry import sync_state
from registry.db.pool import init_connection

# The same derivations in SQL, shared with bench/pgbench.py: keep the two in step.
SQL_ID = "md5({salt} || ':' || {n})::uuid"
SQL_TOKEN_HASH = "sha256(convert_to('rwt_' || {salt} || '_' || {n}, 'UTF8'))"

SEED = f"""
INSERT INTO {{table}} (id, name, status, status_changed_at, token_hash, last_heartbeat_at,
                        error_rate, active_tasks, runtime_state)
SELECT {SQL_ID.format(salt="$1::text", n="n::text")},
       'bench-' || left($1::text, 8) || '-' || n,
       $4::text,
       now() - interval '1 hour',
       {SQL_TOKEN_HASH.format(salt="$1::text", n="n::text")},
       now() - make_interval(secs => $5),
       0, 0, 'ok'
FROM generate_series($2::int, $3::int) AS n
"""


@dataclass(frozen=True, slots=True)
class Fleet:
    salt: str
    size: int

    @classmethod
    def new(cls, size: int) -> Fleet:
        # A fresh salt per run: tokens of an old bench database never match a new one.
        return cls(secrets.token_hex(4), size)

    def workspace_id(self, n: int) -> uuid.UUID:
        return uuid.UUID(hashlib.md5(f"{self.salt}:{n}".encode()).hexdigest())  # noqa: S324

    def token(self, n: int) -> str:
        return f"rwt_{self.salt}_{n}"

    def heartbeat_body(self, n: int) -> bytes:
        # What a healthy runtime sends every interval; no plugins list, so the stored one stays.
        return orjson.dumps(
            {
                "workspace_id": str(self.workspace_id(n)),
                "error_rate": 0.0,
                "active_tasks": 1,
                "uptime_seconds": 3600.0,
                "runtime_state": "ok",
            }
        )

    def write_file(self, path: Path) -> Path:
        """`<id> <token>` per line, for wrk's Lua script."""
        with path.open("w") as out:
            for n in range(1, self.size + 1):
                out.write(f"{self.workspace_id(n)} {self.token(n)}\n")
        return path


async def seed(
    dsn: str, fleet: Fleet, *, status: str = "online", heartbeat_age_s: float = 1.0
) -> None:
    """Insert the fleet in one set-based statement, then VACUUM ANALYZE so the first
    measured seconds do not pay for hint bits and a missing visibility map."""
    conn = await asyncpg.connect(dsn)
    try:
        # Tombstones straight into their own table (migration 0017): inserted into
        # `workspaces`, a trigger would move them, leaving as many dead rows behind.
        table = "removed_workspaces" if status == "removed" else "workspaces"
        await conn.execute(
            SEED.format(table=table), fleet.salt, 1, fleet.size, status, heartbeat_age_s
        )
        await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


async def judge_plugins_sync(conn: asyncpg.Connection) -> None:
    """Store the plugins_sync of every seeded workspace, as migration 0016 leaves a fleet, and
    analyze again. Otherwise the registry under test judges them all in the background
    (~30 s of a core at 100k workspaces) while the bench measures it."""
    await init_connection(conn)
    started = time.perf_counter()
    await sync_state.refresh(conn)
    print(f"judged the plugins_sync of the fleet in {time.perf_counter() - started:.1f} s")
    await conn.execute("VACUUM ANALYZE")
