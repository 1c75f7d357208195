"""Running blocking filesystem work off the event loop without orphaning it on cancel."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_blocking(fn: Callable[[threading.Event], T]) -> T:
    """Run ``fn(stop)`` in a worker thread.

    If the caller is cancelled, ``stop`` is set and we still wait for the worker: it owns
    cleanup of whatever it was writing, and returning early would let the caller (or a
    retry) race with a thread that is still touching the same directories.
    """
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(fn, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future])
        with contextlib.suppress(BaseException):
            future.result()
        raise
