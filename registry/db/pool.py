"""The asyncpg connection pools, tuned for the heartbeat hot path, and where database
failures are classified (db/errors.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
import orjson
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from registry.db.errors import DatabaseUnavailable, database_calls, is_unavailable
from registry.settings import Settings

# asyncpg's own defaults, spelled out because the pool is constructed here (see Pool).
MAX_QUERIES = 50_000
MAX_INACTIVE_S = 300.0

Reset = Callable[[asyncpg.Connection], Awaitable[None]]

if TYPE_CHECKING:  # generic only in asyncpg's stubs
    _CheckoutBase = PoolAcquireContext[asyncpg.Record]
    _PoolBase = asyncpg.Pool[asyncpg.Record]
else:
    _CheckoutBase = PoolAcquireContext
    _PoolBase = asyncpg.Pool


class _Checkout(_CheckoutBase):
    """`async with pool.acquire() as conn`: a failed checkout, and a block that failed because
    the connection did, leave as DatabaseUnavailable; every other error of the block (a
    statement's own, a bug, a client gone) leaves unchanged."""

    __slots__ = ()

    # Plain try/except rather than database_calls(): this runs for every heartbeat batch.
    async def __aenter__(self) -> PoolConnectionProxy[asyncpg.Record]:
        try:
            return await super().__aenter__()
        except Exception as exc:
            if is_unavailable(exc, checkout=True):
                raise DatabaseUnavailable.of(exc) from exc
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            # The release: with asyncpg's reset a round trip, which fails (and terminates the
            # connection) when the outage broke it.
            await super().__aexit__(*exc_info)
        except Exception as exc:
            if is_unavailable(exc, checkout=True):
                raise DatabaseUnavailable.of(exc) from exc
            raise
        error = exc_info[1]
        if isinstance(error, BaseException) and is_unavailable(error):
            raise DatabaseUnavailable.of(error) from error


class Pool(_PoolBase):
    """asyncpg's pool, whose checkouts classify failures. Constructed directly because
    asyncpg.create_pool takes no pool class; `await pool` opens it, as create_pool's does."""

    __slots__ = ()

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[asyncpg.Record]:
        return _Checkout(self, timeout)


async def init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python values, through orjson.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    # asyncpg still rolls back a transaction left open and replaces a connection found
    # closed, at release and at checkout; this skips only its reset query's round trip.
    return None


# The reset policy, per pool.
#
# The main pool keeps asyncpg's reset (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET
# ALL: one round trip per release). Its users hold session state: the pruner takes a session
# advisory lock on a pooled connection (retention.py), and an unlock that never ran (an error,
# a cancellation mid-pass) would otherwise keep every process from pruning for as long as that
# connection lives. The reset also tests each connection as it is released: one broken by an
# outage fails it and is terminated, so this pool needs no expiry after an outage. Its cost
# falls on admin requests, reconciles and background loops, never on heartbeats.
#
# The heartbeat pool skips the reset: apply_beats holds no session state (one statement per
# batch, no session locks, no SET, no LISTEN, no cursors), and the round trip would be one
# more per batch on the hot path. What it gives up is the test at release, so after a
# DatabaseUnavailable the heartbeat ingest expires this pool's connections (ingest.py);
# nothing else expires a pool.


async def create_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
    """The pool for everything but heartbeats."""
    return await _pool(dsn, settings, settings.pool_min_size, settings.pool_max_size, {}, None)


# Generic plans (above), and no sequential scan where an index can serve: the generic plan is
# made once per connection and kept until the table's statistics change, so one made while the
# workspaces table was still empty (a fresh registry, statistics not yet gathered) scanned the
# whole table for every batch once the fleet had grown, until autovacuum next analysed it
# (docs/benchmarks.md). Every scan this statement needs has an index; the setting only rules
# out the plan an empty table makes look cheapest.
HEARTBEAT_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


async def create_heartbeat_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
    """Connections of the heartbeat hot path only: one per batch in flight.

    Apart, so admin requests and reconciles never queue heartbeats behind them. And with
    generic plans: PostgreSQL otherwise re-plans the many-array heartbeat statement on every
    call (0.7 ms of planning for 0.35 ms of execution, measured with one beat per batch), since
    its custom plans never look costlier than a generic one. A generic plan of that statement
    is the same plan: it joins arrays to the primary key.
    """
    size = settings.heartbeat_max_in_flight
    return await _pool(dsn, settings, 1, size, HEARTBEAT_SERVER_SETTINGS, _no_reset)


async def _pool(
    dsn: str,
    settings: Settings,
    min_size: int,
    max_size: int,
    server_settings: dict[str, str],
    reset: Reset | None,
) -> asyncpg.Pool:
    pool = Pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=MAX_QUERIES,
        max_inactive_connection_lifetime=MAX_INACTIVE_S,
        init=init_connection,
        reset=reset,  # None: asyncpg's reset
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        timeout=settings.db_timeout_s,
        command_timeout=settings.db_timeout_s * 6,
        server_settings=server_settings,
    )
    # Opening connects min_size connections: an unreachable database is DatabaseUnavailable
    # here too, which start-up waits out (startup.py).
    with database_calls(checkout=True):
        await pool
    return pool
