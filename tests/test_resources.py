"""Process resources (registry/resources.py): the connection cap kept below the open-files
limit; ThrottledLog and the loop's accept-error handler: a flood is one line per interval, with
the count of what it left out, while other loop errors keep asyncio's default handling. Time is
controlled by setting when the last line was logged, never by waiting."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from registry.resources import FD_RESERVE, AcceptErrorLog, connection_cap
from registry.throttled_log import ThrottledLog

log = logging.getLogger("tests.throttled")


def test_a_flood_is_one_line_then_one_line_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    throttled = ThrottledLog(log, logging.WARNING, every_s=3600.0)

    for _ in range(1000):
        throttled.report("accept() failed: %s", "EMFILE")
    assert [r.getMessage() for r in caplog.records] == ["accept() failed: EMFILE"]

    throttled._last = float("-inf")  # the interval has passed
    throttled.report("accept() failed: %s", "EMFILE")
    assert caplog.records[-1].getMessage() == (
        "accept() failed: EMFILE; 999 more since the last report"
    )
    assert caplog.records[-1].levelno == logging.WARNING


async def test_accept_errors_are_collapsed_and_other_loop_errors_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    handler = AcceptErrorLog(fd_limit=64)
    failure = OSError(errno.EMFILE, "Too many open files")

    for _ in range(500):
        handler(loop, {"message": "socket.accept() out of system resource", "exception": failure})
    handler(loop, {"message": "something else broke"})

    accept_lines = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(accept_lines) == 1
    assert "Too many open files" in accept_lines[0].getMessage()
    assert "open files limit 64" in accept_lines[0].getMessage()
    assert accept_lines[0].exc_info is None
    assert any(
        r.name == "asyncio" and "something else broke" in r.getMessage() for r in caplog.records
    )


def test_the_connection_cap_is_lowered_below_the_open_files_limit_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry.resources")

    assert connection_cap(10_000, 1_048_576) == 10_000
    assert caplog.records == []
    assert connection_cap(10_000, 1024) == 1024 - FD_RESERVE
    assert "REGISTRY_MAX_CONNECTIONS=10000 lowered to 896" in caplog.text
    assert connection_cap(10_000, 64) == 1  # never none at all
