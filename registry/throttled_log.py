"""ThrottledLog: one log line per interval for an event that can repeat thousands of times a
second (a flood of garbage requests, accept() failing while descriptors run out), with the
count of the ones it left out."""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    def __init__(self, logger: logging.Logger, level: int, every_s: float) -> None:
        self.logger = logger
        self.level = level
        self.every_s = every_s
        self._last = float("-inf")
        self._suppressed = 0

    def report(self, message: str, *args: object) -> None:
        """Log `message` unless one was logged less than `every_s` ago; then only count it.
        The next line that is logged says how many were left out since the previous one."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            message += "; %d more since the last report"
            args = (*args, suppressed)
        self.logger.log(self.level, message, *args)
