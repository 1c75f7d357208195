"""Database access: the connection pool, migrations and the query modules."""

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# Query functions accept a plain connection or one borrowed from the pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
