"""Size caps on a git transfer, enforced while it runs rather than after the download.

Two mechanisms, each covering what the other cannot:

- The kernel: git and every helper it starts (upload-pack for local sources, remote-https,
  index-pack) run under RLIMIT_FSIZE, so no file they write, the pack above all, can grow
  past ``file_bytes``; the writer that reaches it is killed by SIGXFSZ at that byte.
- A watcher: every ``POLL_S`` it adds up the repository's files and reads the object count
  each pack announces in its header, and kills the whole process group once either is over
  its cap. This catches what a per-file limit does not (many files, a pack announcing a
  million objects) well before they are written.

A fetch stopped by either is reported as over the cap: ``TransferWatch.verdict`` tells it
from any other failure, and the caller fails the step permanently (``fetch_too_large``): the
same source would be just as large on a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["POLL_S", "TransferCaps", "TransferWatch", "limit_writes"]

POLL_S = 0.05
# Per object in the pack beyond the blob bytes themselves: its header, a tree entry naming
# it (mode, name, 20-byte id), zlib framing. Generous, so a tree that fits is never refused.
_PER_OBJECT_BYTES = 128
# The commit object, refs, FETCH_HEAD, shallow, config: small, but not nothing.
_SLACK_BYTES = 64 * 1024
# What index-pack writes after the pack is complete, per object: .idx (id, crc, offset) and
# .rev (position).
_INDEX_PER_OBJECT_BYTES = 36
# A few trees and the commit on top of one tree and one blob per allowed file, so a small
# max_files does not refuse a tree for its directories alone.
_SLACK_OBJECTS = 64
_PACK_HEADER = 12


@dataclass(frozen=True, slots=True)
class TransferCaps:
    file_bytes: int  # any one file git writes (the pack)
    store_bytes: int  # all of the repository's files together
    objects: int  # objects a pack may announce

    @classmethod
    def for_tree(cls, max_bytes: int, max_files: int) -> TransferCaps:
        """What a fetch may take to bring a tree of at most max_bytes in max_files files.

        A tree that fits is at most max_files blobs, at most as many directories and one
        commit; compressed, a blob is never more than 1/64 above its size (zlib adds ~0.03%
        to incompressible data). The whole commit is fetched (depth 1), so for a subdirectory
        source everything outside it counts too.
        """
        objects = 2 * max_files + _SLACK_OBJECTS
        file_bytes = max_bytes + max_bytes // 64 + _PER_OBJECT_BYTES * objects + _SLACK_BYTES
        store_bytes = file_bytes + _INDEX_PER_OBJECT_BYTES * objects + _SLACK_BYTES
        return cls(file_bytes=file_bytes, store_bytes=store_bytes, objects=objects)


def limit_writes(file_bytes: int) -> Callable[[], None]:
    """A preexec_fn that caps the size of every file the child (and its children) writes.

    It runs between fork and exec, so it only calls setrlimit: nothing that takes a lock
    another thread of this process might hold. No core dump either: one would be written
    into the repository, beyond any cap.
    """

    def apply() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = file_bytes if hard == resource.RLIM_INFINITY else min(file_bytes, hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


@dataclass(slots=True)
class _Measure:
    total_bytes: int = 0
    largest_file: int = 0
    most_objects: int = 0


def _pack_objects(path: Path, known: dict[str, int], name: str) -> int:
    """The object count a pack (or a pack being written) announces in its header; 0 if
    the header is not there yet."""
    if name in known:
        return known[name]
    try:
        with open(path, "rb") as pack:
            header = pack.read(_PACK_HEADER)
    except OSError:
        return 0
    if len(header) < _PACK_HEADER or header[:4] != b"PACK":
        return 0
    count = int.from_bytes(header[8:12], "big")
    known[name] = count
    return count


def _measure(root: Path, known: dict[str, int]) -> _Measure:
    found = _Measure()
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                listing = list(it)
        except OSError:
            continue  # removed under us (git renames its temporary files): next poll sees it
        for entry in listing:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                found.total_bytes += st.st_size
                found.largest_file = max(found.largest_file, st.st_size)
                if entry.name.startswith("tmp_pack_") or entry.name.endswith(".pack"):
                    objects = _pack_objects(Path(entry.path), known, entry.path)
                    found.most_objects = max(found.most_objects, objects)
    return found


class TransferWatch:
    """Watches one git process writing into ``root`` and stops it at the caps."""

    def __init__(self, root: Path, caps: TransferCaps) -> None:
        self._root = root
        self._caps = caps
        self._known: dict[str, int] = {}
        self.stopped: str | None = None  # why the watcher killed the transfer

    def over(self) -> str | None:
        """What is over a cap now, or None."""
        found = _measure(self._root, self._known)
        caps = self._caps
        if found.most_objects > caps.objects:
            return f"the pack holds {found.most_objects} objects, more than {caps.objects}"
        if found.total_bytes > caps.store_bytes:
            return f"{found.total_bytes} bytes fetched, more than {caps.store_bytes}"
        return None

    async def run(self, pid: int) -> None:
        """Poll until cancelled; on a cap, kill the process group ``pid`` leads."""
        while True:
            await asyncio.sleep(POLL_S)
            reason = self.over()
            if reason is not None:
                self.stopped = reason
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                return

    def verdict(self, returncode: int) -> str | None:
        """After the process ended: why the transfer was over its caps, or None.

        A failed fetch that left a file of exactly ``file_bytes`` was stopped by the kernel
        (git reports only that index-pack died); a finished one is measured once more, since
        a fast transfer can complete between two polls.
        """
        if self.stopped is not None:
            return self.stopped
        found = _measure(self._root, self._known)
        if returncode != 0 and found.largest_file >= self._caps.file_bytes:
            return f"a file reached the {self._caps.file_bytes}-byte cap and was stopped"
        return self.over()
