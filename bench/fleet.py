"""A bench fleet: N workspaces addressed by n = 1..N.

Two kinds. A synthetic fleet derives ids and tokens from (salt, n), which lets three parties
agree on it without shipping a list: the seeding SQL, the pgbench script (which can only draw
a random integer) and the Python load generator. A recorded fleet (`bench.api_fleet`: made
through the API, as operators make one) holds the ids and tokens the registry handed out, and
what each runtime reports of its plugins. Either way wrk reads a file written by `write_file`.

The beats' clock: a runtime's `uptime_seconds` at wall time t is `uptime_base + n % 60 +
(floor(t) - epoch)`, in whole seconds, so every sender (Python, wrk's Lua, pgbench's SQL)
computes the same value and a workspace's uptime never goes down from one beat to the next
(which the registry would take for a restart). The sender must also never have two beats of
one workspace in flight at once, as a real runtime never has: two built a second apart could
be applied out of order.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from registry import sync_state
from registry.auth import hash_token
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

# A synthetic fleet's runtimes have been up an hour (the constant body's uptime) or more.
SYNTHETIC_UPTIME_BASE = 3600
# Spread of uptimes across the fleet: n % UPTIME_SPREAD seconds on top of the base.
UPTIME_SPREAD = 60
# Varying bodies: active tasks 0..MAX_TASKS, error rate below this (healthy: under 0.1).
MAX_TASKS = 4
MAX_ERROR_RATE = 0.05

Plugins = list[dict[str, str]]


def varying_fields(uptime: int) -> dict[str, Any]:
    """What changes between a runtime's beats: uptime growing, tasks coming and going, the
    error rate moving a little (always healthy: no status changes)."""
    return {
        "error_rate": round(random.uniform(0.0, MAX_ERROR_RATE), 3),
        "active_tasks": random.randint(0, MAX_TASKS),
        "uptime_seconds": uptime,
    }


def beat_body(
    workspace_id: uuid.UUID, plugins: Plugins | None, acks: list[str] | None = None, **fields: Any
) -> bytes:
    """A heartbeat body; `plugins` None sends no list (the stored one stays), `acks` the
    actions acknowledged."""
    body: dict[str, Any] = {"workspace_id": str(workspace_id), **fields, "runtime_state": "ok"}
    if plugins is not None:
        body["plugins"] = plugins
    if acks:
        body["acks"] = acks
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Member:
    """One workspace of a recorded fleet."""

    workspace_id: uuid.UUID
    token: str
    # What its runtime reports in `plugins` (None: it sends no list).
    plugins: Plugins | None = None


@dataclass(frozen=True, slots=True)
class Fleet:
    salt: str
    size: int
    # The beats' clock (module docstring): unix seconds, and the uptime at that instant.
    epoch: int = 0
    uptime_base: int = SYNTHETIC_UPTIME_BASE
    # A recorded fleet's workspaces, n - 1 indexed; empty: ids and tokens derived from salt.
    members: tuple[Member, ...] = ()

    @classmethod
    def new(cls, size: int) -> Fleet:
        # A fresh salt per run: tokens of an old bench database never match a new one.
        return cls(secrets.token_hex(4), size, epoch=int(time.time()))

    @classmethod
    def recorded(cls, members: list[Member], *, epoch: int, uptime_base: int) -> Fleet:
        return cls(secrets.token_hex(4), len(members), epoch, uptime_base, tuple(members))

    @property
    def is_recorded(self) -> bool:
        return bool(self.members)

    def workspace_id(self, n: int) -> uuid.UUID:
        if self.members:
            return self.members[n - 1].workspace_id
        return uuid.UUID(hashlib.md5(f"{self.salt}:{n}".encode()).hexdigest())  # noqa: S324

    def token(self, n: int) -> str:
        if self.members:
            return self.members[n - 1].token
        return f"rwt_{self.salt}_{n}"

    def plugins(self, n: int) -> Plugins | None:
        return self.members[n - 1].plugins if self.members else None

    def uptime(self, n: int, now: float | None = None) -> int:
        """Workspace n's uptime at wall time `now` (default: now), by the fleet's clock."""
        moment = int(time.time() if now is None else now)
        return self.uptime_base + n % UPTIME_SPREAD + (moment - self.epoch)

    def heartbeat_body(self, n: int) -> bytes:
        # What a healthy runtime sends every interval, always the same; no plugins list
        # (unless the fleet records one), so the stored one stays.
        return beat_body(
            self.workspace_id(n),
            self.plugins(n),
            error_rate=0.0,
            active_tasks=1,
            uptime_seconds=3600.0,
        )

    def varying_body(self, n: int, now: float | None = None) -> bytes:
        """A beat as a real runtime's vary (`varying_fields`), uptime by the fleet's clock."""
        return beat_body(
            self.workspace_id(n), self.plugins(n), **varying_fields(self.uptime(n, now))
        )

    def write_file(self, path: Path) -> Path:
        """`<id> <token> <plugins JSON or ->` per line, for wrk's Lua script and `load`."""
        with path.open("w") as out:
            for n in range(1, self.size + 1):
                plugins = self.plugins(n)
                reported = "-" if plugins is None else orjson.dumps(plugins).decode()
                out.write(f"{self.workspace_id(n)} {self.token(n)} {reported}\n")
        return path

    @classmethod
    def load(cls, path: Path, *, epoch: int, uptime_base: int) -> Fleet:
        """A recorded fleet from a file `write_file` wrote."""
        members = []
        for line in path.read_text().splitlines():
            workspace_id, token, reported = line.split(" ", 2)
            plugins = None if reported == "-" else orjson.loads(reported)
            members.append(Member(uuid.UUID(workspace_id), token, plugins))
        return cls.recorded(members, epoch=epoch, uptime_base=uptime_base)


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


# A bench-owned table that addresses the fleet by n, for pgbench (which can draw a random n but
# cannot read a file): a recorded fleet's ids and tokens cannot be derived from n.
MAPPING = "bench_fleet"


async def record_mapping(dsn: str, fleet: Fleet) -> None:
    """(Re)create `bench_fleet(n, id, token_hash)` with the fleet's workspaces, analysed."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"DROP TABLE IF EXISTS {MAPPING}; CREATE TABLE {MAPPING} "
            "(n int PRIMARY KEY, id uuid NOT NULL, token_hash bytea NOT NULL)"
        )
        await conn.copy_records_to_table(
            MAPPING,
            records=[
                (n, fleet.workspace_id(n), hash_token(fleet.token(n)))
                for n in range(1, fleet.size + 1)
            ],
        )
        await conn.execute(f"VACUUM ANALYZE {MAPPING}")
    finally:
        await conn.close()
