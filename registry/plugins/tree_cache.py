"""A bounded on-disk cache of staged plugin trees, keyed by (source, commit)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from registry.plugins._threads import run_blocking
from registry.plugins.errors import FetchFailed
from registry.plugins.fetch import FetchLimits, StagedPlugin, copy_tree
from registry.plugins.single_flight import SingleFlight

__all__ = ["TreeCache", "TreeKey"]

log = logging.getLogger(__name__)

_META = "entry.json"
_TREE = "tree"
# Prefixes of this cache's own names: the directory may be shared (a staging directory), so
# the sweep touches nothing else.
_INCOMING = ".tree-incoming-"
_TRASH = ".tree-trash-"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class TreeKey:
    """A git tree at a commit: the same bytes whichever workspace or ref asked for it."""

    location: str
    subdir: str | None
    sha: str

    @property
    def name(self) -> str:
        # A hash, so that no URL character ends up in a path; the entry repeats the key in
        # full and is refused if it does not match.
        raw = f"registry-tree-v1\0{self.location}\0{self.subdir or ''}\0{self.sha}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def as_json(self) -> dict[str, str | None]:
        return {"location": self.location, "subdir": self.subdir, "sha": self.sha}


@dataclass(frozen=True, slots=True)
class _Meta:
    digest: str
    size: int


def _read_meta(entry: Path, key: TreeKey | None) -> _Meta | None:
    """The entry's record, or None for anything but a complete entry (of ``key``, if given)."""
    try:
        data = orjson.loads((entry / _META).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not (entry / _TREE).is_dir():
        return None
    digest, size = data.get("digest"), data.get("bytes")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        return None
    if key is not None and data.get("key") != key.as_json():
        return None
    return _Meta(digest, size)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class TreeCache:
    """Staged trees kept under ``root``, so one fetch serves every workspace updated to them.

    An entry is ``root/<hash of key>/`` holding ``tree/`` and ``entry.json`` (the key, the
    tree's content digest and size). It is built under an incoming name and renamed into
    place whole, so a reader never sees a half-written entry; a crash leaves only an
    incoming directory, never used and swept later. Every checkout copies the tree out
    and digests the copy as it goes: a copy that does not match the recorded digest (a cached
    file altered or truncated since) is thrown away with the entry, and the tree fetched
    again. Fills of one key are single-flight in this process; processes sharing ``root``
    at most fetch twice, and the second rename into place loses harmlessly.

    Eviction (after each fill): entries unused for ``idle_s`` go, then the least recently used
    until the total is within ``max_bytes``. An entry being copied out here is never evicted;
    one evicted by another process mid-copy fails the copy, which then counts as a miss.
    ``clock`` is wall time (last use is the entry's mtime, which outlives the process).
    """

    def __init__(
        self,
        root: Path,
        *,
        idle_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self._idle_s = idle_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._fills: SingleFlight[str, None, None] = SingleFlight()
        self._pins: Counter[str] = Counter()
        self._filling: set[str] = set()

    async def checkout(
        self,
        key: TreeKey,
        fetch: Callable[[Path], Awaitable[StagedPlugin]],
        work_dir: Path,
        limits: FetchLimits,
    ) -> StagedPlugin:
        """A private copy of the tree of ``key`` in a new directory under ``work_dir``.

        ``fetch(into)`` stages the tree under ``into`` on a miss. The copy is the caller's
        (delivery moves it away); the cached tree stays.
        """
        copied = await self._copy_out(key, work_dir, limits)
        if copied is not None:
            return copied
        try:
            await self._fills.run(key.name, lambda: self._fill(key, fetch, limits), tag=None)
        except OSError as exc:
            # The cache is a saving, not a step: one that cannot be written (unwritable, full)
            # must not stop installs. A full disk fails the fetch below with its own code.
            log.warning("plugin tree cache %s cannot be filled: %s", self.root, exc)
            return await fetch(work_dir)
        copied = await self._copy_out(key, work_dir, limits)
        if copied is not None:
            return copied
        # Not cacheable (larger than the whole cache) or gone again already: fetch for us.
        return await fetch(work_dir)

    def waiting(self, key: TreeKey) -> int:
        """How many checkouts wait for the fill of ``key`` in progress."""
        return self._fills.followers(key.name)

    async def sweep(self) -> None:
        """Evict by idle time and total size now (also done after every fill)."""
        pinned = frozenset(self._pins)
        filling = frozenset(self._filling)
        await run_blocking(lambda _stop: self._sweep_sync(pinned, filling))

    # ------------------------------------------------------------------ reading

    async def _copy_out(
        self, key: TreeKey, work_dir: Path, limits: FetchLimits
    ) -> StagedPlugin | None:
        self._pins[key.name] += 1
        try:
            return await run_blocking(lambda stop: self._copy_out_sync(key, work_dir, limits, stop))
        except OSError as exc:
            raise FetchFailed(
                f"copying a cached plugin tree failed: {exc}", code="stage_failed", transient=True
            ) from None
        finally:
            self._pins[key.name] -= 1
            if self._pins[key.name] <= 0:
                del self._pins[key.name]

    def _copy_out_sync(
        self, key: TreeKey, work_dir: Path, limits: FetchLimits, stop: threading.Event
    ) -> StagedPlugin | None:
        entry = self.root / key.name
        meta = _read_meta(entry, key)
        if meta is None:
            if os.path.lexists(entry):
                self._discard(entry)  # not an entry we wrote, or one damaged since
            return None
        work_dir.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="plugin-", dir=work_dir))
        # mkdtemp makes 0700; plugins are read by workspace processes under other uids.
        os.chmod(dest, 0o755)  # noqa: S103
        try:
            digest = copy_tree(entry / _TREE, dest, limits, stop)
        except FetchFailed:
            if stop.is_set():
                raise
            # A symlink or a FIFO in the cached tree, or a file gone mid-copy: the entry is
            # not what was fetched (or is being evicted), so it is no entry at all.
            self._discard(entry)
            return None
        except FileNotFoundError:
            shutil.rmtree(dest, ignore_errors=True)
            return None
        if digest != meta.digest:
            shutil.rmtree(dest, ignore_errors=True)
            self._discard(entry)
            return None
        self._touch(entry)
        return StagedPlugin(path=dest, sha=key.sha, digest=digest)

    # ------------------------------------------------------------------ filling

    async def _fill(
        self, key: TreeKey, fetch: Callable[[Path], Awaitable[StagedPlugin]], limits: FetchLimits
    ) -> None:
        await run_blocking(lambda _stop: self.root.mkdir(parents=True, exist_ok=True))
        incoming = Path(
            await run_blocking(lambda _stop: tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        )
        self._filling.add(incoming.name)
        try:
            staged = await fetch(incoming)
            await run_blocking(lambda _stop: self._commit_sync(key, incoming, staged))
        finally:
            self._filling.discard(incoming.name)
            await run_blocking(lambda _stop: shutil.rmtree(incoming, ignore_errors=True))
        await self.sweep()

    def _commit_sync(self, key: TreeKey, incoming: Path, staged: StagedPlugin) -> None:
        os.rename(staged.path, incoming / _TREE)
        size = _tree_bytes(incoming / _TREE)
        if size > self._max_bytes:
            return
        record = {"key": key.as_json(), "digest": staged.digest, "bytes": size}
        fd = os.open(incoming / _META, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, orjson.dumps(record))
            # On disk before the rename: after a crash the entry is whole or absent.
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(incoming, 0o755)  # noqa: S103 - see _copy_out_sync
        entry = self.root / key.name
        try:
            os.rename(incoming, entry)
        except OSError as exc:
            # Another process put the same entry in place first; theirs serves, ours goes.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return
        self._touch(entry)

    # ------------------------------------------------------------------ eviction

    def _touch(self, entry: Path) -> None:
        now = self._clock()
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry, (now, now))

    def _discard(self, entry: Path) -> None:
        # Renamed away first, so nobody finds a half-deleted entry under its name.
        trash = self.root / f"{_TRASH}{uuid.uuid4().hex}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_sync(self, pinned: frozenset[str], filling: frozenset[str]) -> None:
        now = self._clock()
        try:
            children = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        entries: list[tuple[float, Path, int]] = []
        for child in children:
            path = Path(child.path)
            try:
                mtime = child.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if child.name.startswith(_TRASH):
                shutil.rmtree(path, ignore_errors=True)
            elif child.name.startswith(_INCOMING):
                # A fill of a process that died (ours are in `filling`); another live
                # process's fill is younger than a fetch could possibly take.
                if child.name not in filling and now - mtime > self._idle_s:
                    shutil.rmtree(path, ignore_errors=True)
            elif not _ENTRY_NAME.fullmatch(child.name):
                continue
            elif child.name in pinned:
                meta = _read_meta(path, None)
                entries.append((float("inf"), path, meta.size if meta else 0))
            elif (meta := _read_meta(path, None)) is None or now - mtime > self._idle_s:
                self._discard(path)
            else:
                entries.append((mtime, path, meta.size))
        total = sum(size for _, _, size in entries)
        for mtime, path, size in sorted(entries, key=lambda e: e[0]):
            if total <= self._max_bytes or mtime == float("inf"):
                break
            self._discard(path)
            total -= size
