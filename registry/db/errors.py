"""DatabaseUnavailable: the one exception meaning "the database cannot be reached right now".

Only errors of database calls count. They are classified where the database is called (the
pool's checkout and the block that uses the connection, see db/pool.py, and the few direct
connections), so every caller catches this one type and nothing else: an OSError of a client
that hung up, of a full disk or of a plugin fetch is never mistaken for an outage (503s, pool
expiry and "database unavailable" warnings for what is not the database).

Why classify by origin, not by type alone: asyncpg reports a refused or dropped connection as
bare OSError or TimeoutError (from the socket, from its timeouts), the same types a client
socket or the filesystem raises. What asyncpg raised has passed through asyncpg's own code,
which its traceback shows; anything else has not.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from types import TracebackType

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base


class DatabaseUnavailable(Exception):
    """A database call failed because the database cannot be reached; retrying may succeed.
    The error asyncpg (or the socket) raised is its __cause__."""

    @classmethod
    def of(cls, exc: BaseException) -> DatabaseUnavailable:
        return cls(f"{type(exc).__name__}: {exc}")


# asyncpg errors that only a refused, lost or shut-down connection raises.
_CONNECTION_FAILURES: tuple[type[BaseException], ...] = (
    # SQLSTATE class 08: the connection does not exist, failed, was refused.
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # Raised on a pooled connection whose server went away while it sat idle.
    asyncpg.InternalClientError,
)
# InterfaceErrors are mostly "the connection is closed" or "the pool is closing"; these are
# mistakes of the caller instead (a bad argument, a bad setting) and stay what they are.
_MISUSE: tuple[type[BaseException], ...] = (
    asyncpg_base.DataError,
    asyncpg_base.ClientConfigurationError,
    asyncpg_base.UnsupportedClientFeatureError,
    asyncpg_base.UnsupportedServerFeatureError,
)
# The process is out of descriptors: a connect fails, but the database is fine. Reported as
# the OSError it is, not as an outage (a readiness probe must not blame the database).
_LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE})

_ASYNCPG_DIR = os.path.dirname(asyncpg.__file__) + os.sep


def _raised_by_asyncpg(exc: BaseException) -> bool:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_ASYNCPG_DIR):
            return True
        tb = tb.tb_next
    return False


def is_unavailable(exc: BaseException, *, checkout: bool = False) -> bool:
    """Does `exc` mean the database cannot be reached? `checkout`: it was raised by taking a
    connection (pool.acquire, connect), which does nothing but talk to the database, so any
    socket error or timeout counts; elsewhere one counts only if asyncpg raised it."""
    if isinstance(exc, DatabaseUnavailable):
        return False  # already classified
    if isinstance(exc, _CONNECTION_FAILURES):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, _MISUSE)
    if isinstance(exc, OSError) and exc.errno in _LOCAL_EXHAUSTION:
        return False
    if isinstance(exc, OSError | TimeoutError):
        return checkout or _raised_by_asyncpg(exc)
    return False


@contextlib.contextmanager
def database_calls(*, checkout: bool = False) -> Iterator[None]:
    """Around database calls: what means "unreachable" leaves as DatabaseUnavailable, anything
    else unchanged (a statement's own error, a bug)."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc, checkout=checkout):
            raise DatabaseUnavailable.of(exc) from exc
        raise
