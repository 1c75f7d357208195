"""Watching how many bytes a directory holds while something writes into it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def bytes_under(root: Path) -> int:
    """Regular-file bytes under ``root`` now; entries that vanish meanwhile count as gone."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total


@dataclass
class Peak:
    bytes: int = 0
    samples: int = 0


@contextmanager
def peak_bytes_under(root: Path) -> Iterator[Peak]:
    """Sample ``bytes_under(root)`` in a thread every millisecond for the block's duration.

    Sampling can miss a peak between two samples, so this bounds from below what was on disk:
    an assertion that the peak stayed under a cap can only fail when the cap was broken.
    """
    peak = Peak()
    done = threading.Event()

    def sample() -> None:
        # A millisecond between samples leaves the event loop its share of the GIL.
        while not done.wait(0.001):
            peak.bytes = max(peak.bytes, bytes_under(root))
            peak.samples += 1

    thread = threading.Thread(target=sample, name="peak-bytes", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
