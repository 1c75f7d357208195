"""The asyncpg connection pool, tuned for the heartbeat hot path."""

from __future__ import annotations

import asyncpg
import orjson

from registry.settings import Settings

Pool = asyncpg.Pool


async def init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python values, through orjson.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    # asyncpg resets every released connection with a round trip (UNLISTEN, RESET ALL,
    # advisory unlock). Pooled connections here never hold session state: advisory locks and
    # LISTEN live on dedicated connections. Skipping it saves a round trip per request.
    return None


async def create_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.db_timeout_s,
        command_timeout=settings.db_timeout_s * 6,
        init=init_connection,
        reset=_no_reset,
    )
    assert pool is not None
    return pool
