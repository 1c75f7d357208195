"""Atomic installation and removal of staged plugins in a workspace's plugins directory."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from registry.plugins._threads import run_blocking
from registry.plugins.errors import FetchFailed, InvalidSource
from registry.plugins.fetch import StagedPlugin
from registry.plugins.sources import validate_plugin_name

__all__ = ["deliver_to_filesystem", "installed_path", "remove_from_filesystem"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Errors meaning "this kernel or filesystem cannot exchange", not "the exchange failed".
_EXCHANGE_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})

_RenameAt2 = Callable[[int, bytes, int, bytes, int], int]


@functools.cache
def _renameat2() -> _RenameAt2 | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False if the platform cannot do it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


# Indirection so tests can make one particular rename fail.
_rename = os.rename


def _validate_workspace_id(workspace_id: str) -> str:
    try:
        return str(uuid.UUID(workspace_id))
    except (ValueError, TypeError, AttributeError):
        raise InvalidSource(
            f"invalid workspace id {workspace_id!r}", code="invalid_workspace_id"
        ) from None


def installed_path(plugins_dir: Path, workspace_id: str, name: str) -> Path:
    """Where plugin ``name`` of a workspace lives: plugins_dir/<workspace uuid>/<name>."""
    return Path(plugins_dir) / _validate_workspace_id(workspace_id) / validate_plugin_name(name)


_locks: weakref.WeakValueDictionary[Path, asyncio.Lock] = weakref.WeakValueDictionary()


def _lock_for(target: Path) -> asyncio.Lock:
    # Two deliveries of the same plugin in one process would otherwise race on the same
    # target and staging area.
    lock = _locks.get(target)
    if lock is None:
        lock = asyncio.Lock()
        _locks[target] = lock
    return lock


def _ensure_workspace_dir(ws_dir: Path) -> None:
    ws_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        ws_dir.mkdir(mode=0o755)
    if ws_dir.is_symlink() or not ws_dir.is_dir():
        raise FetchFailed(
            f"workspace plugin directory {str(ws_dir)!r} is not a plain directory",
            code="path_escape",
        )


def _swap_in(new: Path, target: Path, trash: Path) -> None:
    """Put ``new`` at ``target``; any previous install ends up inside ``trash``."""
    if os.path.lexists(target):
        if _exchange(new, target):
            return
        old = trash / "old"
        _rename(target, old)
        try:
            _rename(new, target)
        except BaseException:
            # Put the previous install back; if even that fails, keep it in trash so
            # the caller does not delete the only copy.
            _rename(old, target)
            raise
        return
    try:
        _rename(new, target)
    except OSError as exc:
        # Someone installed the target between our check and the rename.
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _exchange(new, target):
            raise


def _deliver_sync(staged: Path, ws_dir: Path, target: Path, _stop: threading.Event) -> None:
    _ensure_workspace_dir(ws_dir)
    trash = Path(tempfile.mkdtemp(prefix=".staging-", dir=ws_dir))
    new = trash / "new"
    moved = False
    swapped = False
    try:
        try:
            _rename(staged, new)
            moved = True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Different filesystem: copy next to the target first so the final step is
            # still a same-filesystem rename.
            shutil.copytree(staged, new, symlinks=True)
        os.chmod(new, 0o755)  # noqa: S103 - workspaces read plugins under other uids
        _swap_in(new, target, trash)
        swapped = True
    except BaseException:
        if moved and os.path.isdir(new) and not os.path.lexists(staged):
            # Hand the staged tree back so the caller can retry without re-fetching.
            with contextlib.suppress(OSError):
                _rename(new, staged)
        if os.path.lexists(trash / "old"):
            raise
        shutil.rmtree(trash, ignore_errors=True)
        raise
    if swapped:
        if not moved:
            shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


async def deliver_to_filesystem(
    staged: StagedPlugin, plugins_dir: Path, workspace_id: str, name: str
) -> None:
    """Atomically install ``staged`` as plugins_dir/<workspace_id>/<name>.

    The staged directory is consumed (moved, or copied and removed across
    filesystems). On failure the previous install, if any, is left untouched and the
    staged directory is put back where possible.
    """
    target = installed_path(plugins_dir, workspace_id, name)
    async with _lock_for(target):
        try:
            await run_blocking(
                lambda stop: _deliver_sync(Path(staged.path), target.parent, target, stop)
            )
        except OSError as exc:
            raise FetchFailed(
                f"installing plugin {name!r} failed: {exc}", code="delivery_failed", transient=True
            ) from None


def _remove_sync(target: Path, _stop: threading.Event) -> None:
    if not os.path.lexists(target):
        return
    ws_dir = target.parent
    if ws_dir.is_symlink():
        raise FetchFailed(
            f"workspace plugin directory {str(ws_dir)!r} is a symlink", code="path_escape"
        )
    # Rename first so the plugin disappears atomically, then delete at leisure.
    trash = Path(tempfile.mkdtemp(prefix=".removing-", dir=ws_dir))
    try:
        _rename(target, trash / "old")
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


async def remove_from_filesystem(plugins_dir: Path, workspace_id: str, name: str) -> None:
    """Remove an installed plugin; a no-op if it is not installed."""
    target = installed_path(plugins_dir, workspace_id, name)
    async with _lock_for(target):
        try:
            await run_blocking(lambda stop: _remove_sync(target, stop))
        except OSError as exc:
            raise FetchFailed(
                f"removing plugin {name!r} failed: {exc}", code="delivery_failed", transient=True
            ) from None


def _remove_workspace_sync(ws_dir: Path, _stop: threading.Event) -> None:
    if ws_dir.is_symlink():
        # Never follow it: what it points at is not ours. The link itself goes.
        ws_dir.unlink(missing_ok=True)
        return
    # Rename first, so a half-deleted tree is never seen at the workspace's path.
    trash = ws_dir.with_name(f".removing-{ws_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        _rename(ws_dir, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


async def remove_workspace_from_filesystem(plugins_dir: Path, workspace_id: str) -> None:
    """Remove a removed workspace's whole plugins directory; a no-op if it has none."""
    ws_dir = Path(plugins_dir) / _validate_workspace_id(workspace_id)
    await run_blocking(lambda stop: _remove_workspace_sync(ws_dir, stop))
