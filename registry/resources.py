"""Process resources at start: the open-files limit raised to what the system allows, the
connection cap kept below it, and accept() failures at the limit logged once per interval.

Why raise it: the soft RLIMIT_NOFILE is often 1,024 while the hard limit is far higher; every
connection, pool connection, git process and staged file takes a descriptor, and running out
makes accept() fail. Raising the soft limit to the hard one needs no privilege.

Why a cap below it: a connection cap at or above the descriptor limit does not protect anything;
the cap (REGISTRY_MAX_CONNECTIONS) is lowered to leave FD_RESERVE descriptors for the pools,
git and files, and the log says so.

Why an exception handler: when accept() fails with EMFILE, asyncio's accept loop calls the
loop's exception handler once per queued connection (up to the backlog, every tick it retries),
and the default handler logs each with a traceback: ~70,000 lines in 15 s. The handler here
collapses those into one warning per interval with the count; every other context goes to
asyncio's default handler unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from registry.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: both pools, git, files, the listeners.
FD_RESERVE = 128
ACCEPT_LOG_EVERY_S = 10.0
_ACCEPT_FAILED = "socket.accept() out of system resource"


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        log.info("open files limit: %d (the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit: %d; raising it to %d failed: %s", soft, hard, exc)
        return soft
    log.info("open files limit raised from %d to %d (the hard limit)", soft, hard)
    return hard


def connection_cap(wanted: int, fd_limit: int) -> int:
    """REGISTRY_MAX_CONNECTIONS, lowered (and logged) if the descriptors cannot hold it."""
    room = max(1, fd_limit - FD_RESERVE)
    if wanted <= room:
        return wanted
    log.warning(
        "REGISTRY_MAX_CONNECTIONS=%d lowered to %d: the open files limit is %d and %d "
        "descriptors are kept for the pools, git and files",
        wanted,
        room,
        fd_limit,
        FD_RESERVE,
    )
    return room


class AcceptErrorLog:
    """The loop's exception handler: accept() failures collapsed, everything else as before."""

    def __init__(self, fd_limit: int, every_s: float = ACCEPT_LOG_EVERY_S) -> None:
        self.fd_limit = fd_limit
        self._log = ThrottledLog(log, logging.WARNING, every_s)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        # No traceback: the error is the process's limit, not a bug; its text says which.
        self._log.report(
            "accept() failed: %s (open files limit %d); new connections wait in the backlog",
            context.get("exception"),
            self.fd_limit,
        )


def install_accept_error_log(fd_limit: int) -> None:
    asyncio.get_running_loop().set_exception_handler(AcceptErrorLog(fd_limit))
