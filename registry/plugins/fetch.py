"""Resolving plugin versions and staging verified plugin trees from file and git sources."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from registry.plugins._threads import run_blocking
from registry.plugins.errors import FetchFailed
from registry.plugins.sources import PluginSource, SourceSettings, check_allowed, is_commit_sha
from registry.plugins.transfer import TransferCaps, TransferWatch, limit_writes

__all__ = [
    "FetchLimits",
    "Pinned",
    "StagedPlugin",
    "copy_tree",
    "resolve_pinned",
    "resolve_version",
    "stage",
    "tree_digest",
]


@dataclass(frozen=True, slots=True)
class FetchLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_files: int = 10_000
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class StagedPlugin:
    path: Path
    sha: str  # the version: the commit for git, the content digest for file sources
    # The content digest of the staged tree (tree_digest), whatever the source: what a
    # runtime can compute from the delivered directory and report as the plugin's sha.
    digest: str


@dataclass(frozen=True, slots=True)
class Pinned:
    """What a git ref resolved to: the commit, and the remote ref it came from (None for a
    declared sha), which a server that refuses unadvertised wants is fetched through."""

    sha: str
    refname: str | None


# --------------------------------------------------------------------------- ignore list

_IGNORED_NAMES = frozenset({"__pycache__", ".git"})
_IGNORED_FILE_SUFFIXES = (".pyc", ".pyo")
_MAX_DEPTH = 64
_CHUNK = 1024 * 1024


def _is_ignored(name: str, is_dir: bool) -> bool:
    if name in _IGNORED_NAMES or name.endswith(".egg-info"):
        return True
    return not is_dir and name.endswith(_IGNORED_FILE_SUFFIXES)


def _too_large(message: str) -> FetchFailed:
    return FetchFailed(message, code="tree_too_large")


def _timeout() -> FetchFailed:
    return FetchFailed("plugin fetch timed out", code="fetch_timeout", transient=True)


# --------------------------------------------------------------------------- tree walking


class _TreeWalk:
    """One pass over a directory: validate, optionally copy, and digest.

    Everything is opened relative to directory fds with O_NOFOLLOW, so swapping a
    directory for a symlink halfway through cannot redirect the walk outside the root.
    """

    def __init__(
        self,
        limits: FetchLimits | None,
        deadline: float | None,
        stop: threading.Event | None,
        dest: Path | None,
    ) -> None:
        self._limits = limits
        self._deadline = deadline
        self._stop = stop
        self._dest = dest
        self._files = 0
        self._dirs = 0
        self._bytes = 0
        self._records: list[tuple[bytes, bool, bytes]] = []

    def run(self, root: Path) -> str:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FetchFailed(
                f"source directory {str(root)!r} does not exist",
                code="source_unreachable",
                transient=True,
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(root):
                raise FetchFailed(f"{str(root)!r} is a symlink", code="symlink_refused") from None
            if exc.errno == errno.ENOTDIR:
                raise FetchFailed(
                    f"{str(root)!r} is not a directory", code="not_a_directory"
                ) from None
            raise FetchFailed(
                f"cannot open {str(root)!r}: {exc.strerror}",
                code="source_unreachable",
                transient=True,
            ) from None
        try:
            self._walk(fd, (), 0)
        finally:
            os.close(fd)
        return _digest_records(self._records)

    def _check_time(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise FetchFailed("plugin staging was cancelled", code="cancelled", transient=True)
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise _timeout()

    def _walk(self, dir_fd: int, rel: tuple[str, ...], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _too_large(f"directory nesting deeper than {_MAX_DEPTH}")
        with os.scandir(dir_fd) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            self._check_time()
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if _is_ignored(name, is_dir):
                continue
            path = (*rel, name)
            if stat.S_ISLNK(st.st_mode):
                raise FetchFailed(f"symlink {'/'.join(path)!r} refused", code="symlink_refused")
            if is_dir:
                self._enter_dir(dir_fd, name, path, depth)
            elif stat.S_ISREG(st.st_mode):
                self._take_file(dir_fd, name, path, st)
            else:
                raise FetchFailed(
                    f"{'/'.join(path)!r} is not a regular file or directory",
                    code="unsupported_file_type",
                )

    def _enter_dir(self, dir_fd: int, name: str, path: tuple[str, ...], depth: int) -> None:
        self._dirs += 1
        if self._limits is not None and self._dirs > self._limits.max_files:
            raise _too_large(f"more than {self._limits.max_files} directories")
        if self._dest is not None:
            os.mkdir(self._dest.joinpath(*path), 0o755)
        try:
            sub_fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FetchFailed(
                    f"{'/'.join(path)!r} changed into a symlink", code="symlink_refused"
                ) from None
            raise
        try:
            self._walk(sub_fd, path, depth + 1)
        finally:
            os.close(sub_fd)

    def _take_file(self, dir_fd: int, name: str, path: tuple[str, ...], st: os.stat_result) -> None:
        self._files += 1
        limits = self._limits
        if limits is not None:
            if self._files > limits.max_files:
                raise _too_large(f"more than {limits.max_files} files")
            if self._bytes + st.st_size > limits.max_bytes:
                raise _too_large(f"more than {limits.max_bytes} bytes")
        # O_NONBLOCK so a file swapped for a FIFO cannot hang the open.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            src = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FetchFailed(
                    f"{'/'.join(path)!r} changed into a symlink", code="symlink_refused"
                ) from None
            raise
        dst: int | None = None
        try:
            fst = os.fstat(src)
            if not stat.S_ISREG(fst.st_mode):
                raise FetchFailed(
                    f"{'/'.join(path)!r} is not a regular file", code="unsupported_file_type"
                )
            executable = bool(fst.st_mode & stat.S_IXUSR)
            if self._dest is not None:
                dst = os.open(
                    self._dest.joinpath(*path),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            content = hashlib.sha256()
            while chunk := os.read(src, _CHUNK):
                self._bytes += len(chunk)
                if limits is not None and self._bytes > limits.max_bytes:
                    raise _too_large(f"more than {limits.max_bytes} bytes")
                content.update(chunk)
                if dst is not None:
                    _write_all(dst, chunk)
                self._check_time()
            if dst is not None:
                os.fchmod(dst, 0o755 if executable else 0o644)
        finally:
            os.close(src)
            if dst is not None:
                os.close(dst)
        self._records.append((os.fsencode("/".join(path)), executable, content.digest()))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _digest_records(records: list[tuple[bytes, bool, bytes]]) -> str:
    # Per-file content hashes keep the framing unambiguous: a path can never contain NUL
    # and every content hash has a fixed length.
    outer = hashlib.sha256(b"registry-plugin-tree-v1\0")
    for path, executable, content in sorted(records):
        outer.update(path + b"\0" + (b"x" if executable else b"-") + content)
    return outer.hexdigest()


def tree_digest(root: Path, *, limits: FetchLimits | None = None) -> str:
    """Content digest of a directory tree (paths, executable bits, file contents).

    Generated files (``__pycache__``, ``.git``, ``*.egg-info``, ``*.pyc``, ``*.pyo``) are
    ignored; symlinks raise FetchFailed(code='symlink_refused').
    """
    return _TreeWalk(limits, None, None, None).run(Path(root))


def copy_tree(root: Path, dest: Path, limits: FetchLimits, stop: threading.Event) -> str:
    """Copy a tree into the new directory ``dest`` and return the digest of what was copied.

    The digest is of the bytes read during the copy, so comparing it with a digest recorded
    earlier proves the copy is what was recorded (a cached tree that was altered is caught).
    On failure ``dest`` is removed.
    """
    return _copy_file_source(Path(root), Path(dest), limits, _deadline(limits), stop)


# --------------------------------------------------------------------------- file sources


def _file_root(source: PluginSource) -> Path:
    location = source.location
    if not os.path.isabs(location):
        raise FetchFailed("file source location is not absolute", code="path_escape")
    if not source.subdir:
        return Path(location)
    root = os.path.normpath(os.path.join(location, source.subdir))
    if not root.startswith(location.rstrip("/") + "/"):
        raise FetchFailed("subdirectory escapes the source", code="path_escape")
    real = os.path.realpath(root)
    if real != root:
        if not real.startswith(location.rstrip("/") + "/"):
            raise FetchFailed("subdirectory escapes the source", code="path_escape")
        raise FetchFailed("subdirectory path goes through a symlink", code="symlink_refused")
    return Path(root)


def _deadline(limits: FetchLimits) -> float:
    return time.monotonic() + limits.timeout_s


async def _file_digest(source: PluginSource, limits: FetchLimits) -> str:
    root = _file_root(source)
    deadline = _deadline(limits)
    return await run_blocking(lambda stop: _TreeWalk(limits, deadline, stop, None).run(root))


def _copy_file_source(
    root: Path, dest: Path, limits: FetchLimits, deadline: float, stop: threading.Event
) -> str:
    try:
        digest = _TreeWalk(limits, deadline, stop, dest).run(root)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return digest


async def _stage_file(source: PluginSource, limits: FetchLimits, work_dir: Path) -> StagedPlugin:
    root = _file_root(source)
    deadline = _deadline(limits)
    dest = Path(tempfile.mkdtemp(prefix="plugin-", dir=work_dir))
    # mkdtemp makes 0700; plugins are read by workspace processes under other uids.
    os.chmod(dest, 0o755)  # noqa: S103
    try:
        digest = await run_blocking(
            lambda stop: _copy_file_source(root, dest, limits, deadline, stop)
        )
    except OSError as exc:
        raise FetchFailed(
            f"copying the plugin failed: {exc.strerror}", code="stage_failed", transient=True
        ) from None
    return StagedPlugin(path=dest, sha=digest, digest=digest)


# --------------------------------------------------------------------------- git plumbing

# The variables `git rev-parse --local-env-vars` lists: inherited from a surrounding
# repository (hooks, CI) they would redirect our commands at the wrong object store.
_GIT_LOCAL_ENV = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_OBJECT_DIRECTORY",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_INDEX_FILE",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE",
        "GIT_PREFIX",
        "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
    }
)

# Redirects are off because the allowlist vouches for the URL as written, not for
# wherever a server sends us; submodules are never followed.
_GIT_CONFIG_ARGS = (
    "-c",
    "http.followRedirects=false",
    "-c",
    "submodule.recurse=false",
    "-c",
    "fetch.recurseSubmodules=false",
    "-c",
    "credential.interactive=never",
    # A fetched object that is corrupt or malformed is refused, not stored and served.
    "-c",
    "transfer.fsckObjects=true",
    # Always keep the fetched pack as one file, never explode it into loose objects: the
    # file-size limit of a fetch (registry/plugins/transfer.py) then bounds the download.
    "-c",
    "fetch.unpackLimit=1",
)

_PEELED = "^{}"
_MAX_STDERR = 600
_CREDENTIALS_RE = re.compile(r"://[^/@\s]+@")


def _git_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _GIT_LOCAL_ENV
        and not key.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))
    }
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="true",
        SSH_ASKPASS="true",
        # No system or user configuration: a `url.<x>.insteadOf` in the service user's
        # ~/.gitconfig would otherwise redirect an allowlisted source somewhere else.
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_ALLOW_PROTOCOL="file:git:http:https:ssh",
        # Error classification reads git's messages, so they must not be translated.
        LC_ALL="C",
        LANGUAGE="C",
    )
    return env


@dataclass(frozen=True, slots=True)
class _GitResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    def error_text(self) -> str:
        text = self.stderr.decode("utf-8", "replace").strip()
        text = _CREDENTIALS_RE.sub("://***@", text)
        return text[-_MAX_STDERR:]


async def _spawn_git(
    args: list[str],
    *,
    git_dir: Path | None,
    cwd: Path,
    stdin: int,
    capture_stderr: bool,
    max_file_bytes: int | None = None,
) -> asyncio.subprocess.Process:
    command = ["git", *_GIT_CONFIG_ARGS]
    if git_dir is not None:
        command += ["--git-dir", str(git_dir)]
    command += args
    # A new session gives git and its helpers (remote-https, ssh, upload-pack) one
    # process group we can kill as a whole on timeout.
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        # Unread stderr could fill its pipe and stall a streaming command.
        stderr=asyncio.subprocess.PIPE if capture_stderr else asyncio.subprocess.DEVNULL,
        env=_git_env(),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=None if max_file_bytes is None else limit_writes(max_file_bytes),
    )


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _git(args: list[str], *, git_dir: Path | None, cwd: Path) -> _GitResult:
    proc = await _spawn_git(
        args, git_dir=git_dir, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, capture_stderr=True
    )
    try:
        stdout, stderr = await proc.communicate()
    finally:
        await _reap(proc)
    assert proc.returncode is not None
    return _GitResult(proc.returncode, stdout, stderr)


async def _git_fetch(args: list[str], *, git_dir: Path, caps: TransferCaps) -> _GitResult:
    """`git fetch` into ``git_dir``, stopped as soon as it outgrows ``caps``."""
    proc = await _spawn_git(
        ["fetch", *args],
        git_dir=git_dir,
        cwd=git_dir,
        stdin=asyncio.subprocess.DEVNULL,
        capture_stderr=True,
        max_file_bytes=caps.file_bytes,
    )
    watch = TransferWatch(git_dir, caps)
    try:
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(watch.run(proc.pid))
            stdout, stderr = await proc.communicate()
            watcher.cancel()
    finally:
        await _reap(proc)
    assert proc.returncode is not None
    over = watch.verdict(proc.returncode)
    if over is not None:
        raise FetchFailed(f"fetch stopped at the size cap: {over}", code="fetch_too_large")
    return _GitResult(proc.returncode, stdout, stderr)


# What git says when transfer.fsckObjects refuses a fetched object (a tree entry named `..`
# or `.git`, a malformed object): the source's content is at fault, and a retry fetches it
# again, so this is permanent.
_FSCK_REFUSED = ("fsck error", "fsck-objects")


def _remote_failure(result: _GitResult, source: PluginSource) -> FetchFailed:
    text = result.error_text()
    if any(marker in text for marker in _FSCK_REFUSED):
        return FetchFailed(f"git refused an object of {source.raw}: {text}", code="object_refused")
    if "not allowed" in text and "transport" in text:
        return FetchFailed(f"git transport refused: {text}", code="protocol_not_allowed")
    return FetchFailed(
        f"cannot reach {source.raw}: {text}", code="source_unreachable", transient=True
    )


def _ref_candidates(ref: str) -> list[str]:
    # The order git itself uses to turn a short name into a remote ref: exact, tags, heads.
    if ref == "HEAD" or ref.startswith("refs/"):
        return [ref + _PEELED, ref]
    return [f"refs/tags/{ref}{_PEELED}", f"refs/tags/{ref}", f"refs/heads/{ref}"]


async def _resolve_git(source: PluginSource, cwd: Path) -> tuple[str, str | None]:
    """Return (commit sha, remote ref name it came from or None for an explicit sha)."""
    ref = source.ref or "HEAD"
    if is_commit_sha(ref):
        return ref.lower(), None
    candidates = _ref_candidates(ref)
    result = await _git(["ls-remote", "--", source.location, *candidates], git_dir=None, cwd=cwd)
    if result.returncode != 0:
        raise _remote_failure(result, source)
    advertised: dict[str, str] = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        sha, _, name = line.partition("\t")
        if is_commit_sha(sha):
            advertised[name] = sha.lower()
    for name in candidates:
        if name in advertised:
            return advertised[name], name.removesuffix(_PEELED)
    raise FetchFailed(f"ref {ref!r} not found in {source.raw}", code="ref_not_found")


_REFUSED_WANT = (
    "not our ref",
    "unadvertised object",
    "couldn't find remote ref",
    "no such remote ref",
    "bad object",
)
_FETCHED_REF = "refs/plugin/fetched"


async def _rev_parse(git_dir: Path, expr: str) -> str | None:
    result = await _git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", expr], git_dir=git_dir, cwd=git_dir
    )
    if result.returncode != 0:
        return None
    return result.stdout.decode("ascii", "replace").strip()


async def _fetch_commit(
    git_dir: Path, source: PluginSource, sha: str, refname: str | None, caps: TransferCaps
) -> None:
    base = ["--quiet", "--no-tags", "--no-recurse-submodules", "--depth=1", "--"]
    result = await _git_fetch(
        [*base, source.location, f"+{sha}:{_FETCHED_REF}"], git_dir=git_dir, caps=caps
    )
    if result.returncode == 0:
        if await _rev_parse(git_dir, f"{sha}^{{commit}}") != sha:
            raise FetchFailed(f"{sha} is not a commit", code="ref_not_found")
        return
    refused = any(marker in result.error_text() for marker in _REFUSED_WANT)
    if not refused:
        raise _remote_failure(result, source)
    if refname is None:
        raise FetchFailed(f"commit {sha} not found in {source.raw}", code="ref_not_found")
    # Servers without allow*SHA1InWant only serve advertised refs: fetch the ref and make
    # sure it still points at the commit we resolved.
    result = await _git_fetch(
        [*base, source.location, f"+{refname}:{_FETCHED_REF}"], git_dir=git_dir, caps=caps
    )
    if result.returncode != 0:
        raise _remote_failure(result, source)
    fetched = await _rev_parse(git_dir, f"{_FETCHED_REF}^{{commit}}")
    if fetched != sha:
        raise FetchFailed(
            f"{refname} moved from {sha} to {fetched} while fetching",
            code="ref_moved",
            transient=True,
        )


@dataclass(frozen=True, slots=True)
class _Blob:
    path: tuple[str, ...]
    oid: str
    size: int
    executable: bool


def _parse_tree_listing(listing: bytes, limits: FetchLimits) -> list[_Blob]:
    blobs: list[_Blob] = []
    total = 0
    for record in listing.split(b"\0"):
        if not record:
            continue
        meta, tab, raw_path = record.partition(b"\t")
        fields = meta.split()
        if not tab or len(fields) != 4:
            raise FetchFailed("unexpected git ls-tree output", code="invalid_tree")
        mode, kind, oid_raw, size_raw = fields
        path = os.fsdecode(raw_path)
        parts = tuple(path.split("/"))
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise FetchFailed(f"tree path {path!r} escapes the plugin root", code="path_escape")
        if any(_is_ignored(p, True) for p in parts[:-1]) or _is_ignored(parts[-1], False):
            continue
        if mode == b"120000":
            raise FetchFailed(f"symlink {path!r} refused", code="symlink_refused")
        if mode == b"160000" or kind == b"commit":
            raise FetchFailed(f"submodule {path!r} refused", code="submodule_refused")
        if kind != b"blob" or mode not in (b"100644", b"100755"):
            raise FetchFailed(f"unsupported tree entry {path!r}", code="unsupported_file_type")
        size = int(size_raw)
        total += size
        blobs.append(_Blob(parts, oid_raw.decode("ascii"), size, mode == b"100755"))
        if len(blobs) > limits.max_files:
            raise _too_large(f"more than {limits.max_files} files")
        if total > limits.max_bytes:
            raise _too_large(f"more than {limits.max_bytes} bytes")
    return blobs


def _write_batch(dest: Path, batch: list[tuple[_Blob, bytes]]) -> None:
    for blob, data in batch:
        target = dest.joinpath(*blob.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            _write_all(fd, data)
            os.fchmod(fd, 0o755 if blob.executable else 0o644)
        finally:
            os.close(fd)


async def _materialise(
    git_dir: Path, sha: str, subdir: str | None, dest: Path, limits: FetchLimits
) -> None:
    treeish = f"{sha}:{subdir}" if subdir else sha
    if subdir:
        kind = await _git(["cat-file", "-t", treeish], git_dir=git_dir, cwd=git_dir)
        if kind.returncode != 0 or kind.stdout.strip() != b"tree":
            raise FetchFailed(
                f"subdirectory {subdir!r} not found at {sha}", code="subdir_not_found"
            )
    listing = await _git(
        ["ls-tree", "-r", "-z", "-l", "--end-of-options", treeish], git_dir=git_dir, cwd=git_dir
    )
    if listing.returncode != 0:
        raise FetchFailed(f"cannot list {treeish}: {listing.error_text()}", code="invalid_tree")
    # Everything is checked before the first byte is written, so a refused tree never
    # leaves a partial copy behind.
    blobs = _parse_tree_listing(listing.stdout, limits)
    # Blob contents come straight from the object store: unlike checkout or archive,
    # cat-file applies no smudge filters, eol conversion or export-subst.
    proc = await _spawn_git(
        ["cat-file", "--batch"],
        git_dir=git_dir,
        cwd=git_dir,
        stdin=asyncio.subprocess.PIPE,
        capture_stderr=False,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        batch: list[tuple[_Blob, bytes]] = []
        pending = 0
        for blob in blobs:
            proc.stdin.write(blob.oid.encode("ascii") + b"\n")
            await proc.stdin.drain()
            header = (await proc.stdout.readline()).split()
            if len(header) != 3 or header[1] != b"blob" or header[2] != str(blob.size).encode():
                raise FetchFailed(
                    f"object {blob.oid} is missing or not a blob", code="invalid_tree"
                )
            data = await proc.stdout.readexactly(blob.size + 1)
            batch.append((blob, data[:-1]))
            pending += blob.size
            if pending >= 8 * _CHUNK or len(batch) >= 512:
                await asyncio.to_thread(_write_batch, dest, batch)
                batch, pending = [], 0
        if batch:
            await asyncio.to_thread(_write_batch, dest, batch)
        proc.stdin.close()
    finally:
        await _reap(proc)


async def _stage_git(
    source: PluginSource, limits: FetchLimits, work_dir: Path, pinned: Pinned | None
) -> StagedPlugin:
    git_dir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=work_dir))
    dest = Path(tempfile.mkdtemp(prefix="plugin-", dir=work_dir))
    staged = False
    try:
        try:
            async with asyncio.timeout(limits.timeout_s):
                init = await _git(
                    ["init", "--bare", "--quiet", "--template=", "--", str(git_dir)],
                    git_dir=None,
                    cwd=git_dir,
                )
                if init.returncode != 0:
                    raise FetchFailed(
                        f"git init failed: {init.error_text()}", code="stage_failed", transient=True
                    )
                if pinned is None:
                    sha, refname = await _resolve_git(source, git_dir)
                else:
                    sha, refname = pinned.sha, pinned.refname
                caps = TransferCaps.for_tree(limits.max_bytes, limits.max_files)
                await _fetch_commit(git_dir, source, sha, refname, caps)
                await _materialise(git_dir, sha, source.subdir, dest, limits)
                digest = await run_blocking(
                    lambda stop: _TreeWalk(limits, None, stop, None).run(dest)
                )
        except TimeoutError:
            raise _timeout() from None
        except (FileExistsError, NotADirectoryError):
            raise FetchFailed("tree has conflicting paths", code="invalid_tree") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise FetchFailed(
                f"staging failed: {exc}", code="stage_failed", transient=True
            ) from None
        os.chmod(dest, 0o755)  # noqa: S103 - see _stage_file
        staged = True
        return StagedPlugin(path=dest, sha=sha, digest=digest)
    finally:
        await asyncio.to_thread(shutil.rmtree, git_dir, True)
        if not staged:
            await asyncio.to_thread(shutil.rmtree, dest, True)


# --------------------------------------------------------------------------- public API


async def resolve_version(
    source: PluginSource, settings: SourceSettings, limits: FetchLimits
) -> str:
    """The version ``stage`` would install now: commit sha for git, tree digest for file."""
    if source.kind == "file":
        check_allowed(source, settings)
        try:
            return await _file_digest(source, limits)
        except OSError as exc:
            raise _unresolvable(source, exc) from None
    return (await resolve_pinned(source, settings, limits)).sha


def _unresolvable(source: PluginSource, exc: OSError) -> FetchFailed:
    # An unreadable source tree, git that cannot be spawned: this step's failure.
    return FetchFailed(
        f"cannot resolve {source.raw}: {exc}", code="source_unreachable", transient=True
    )


async def resolve_pinned(
    source: PluginSource, settings: SourceSettings, limits: FetchLimits
) -> Pinned:
    """Resolve a git source's ref to the commit ``stage(..., pinned=)`` then fetches."""
    check_allowed(source, settings)
    if source.kind != "git":
        raise FetchFailed(f"{source.raw} is not a git source", code="invalid_source")
    try:
        async with asyncio.timeout(limits.timeout_s):
            # cwd '/' keeps git from discovering (and reading the config of) whatever
            # repository the service happens to be started in.
            sha, refname = await _resolve_git(source, Path("/"))
    except TimeoutError:
        raise _timeout() from None
    except OSError as exc:
        raise _unresolvable(source, exc) from None
    return Pinned(sha, refname)


async def stage(
    source: PluginSource,
    settings: SourceSettings,
    limits: FetchLimits,
    work_dir: Path,
    *,
    pinned: Pinned | None = None,
) -> StagedPlugin:
    """Fetch ``source`` into a fresh directory under ``work_dir`` and return it with its sha.

    ``pinned`` (git only) is a resolution made earlier (resolve_pinned): the commit is
    fetched without asking the remote for the ref again. The caller owns the returned
    directory (delivery moves it away). On failure nothing is left under ``work_dir``.
    """
    check_allowed(source, settings)
    work_dir = Path(work_dir)
    try:
        await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
        if source.kind == "file":
            return await _stage_file(source, limits, work_dir)
        return await _stage_git(source, limits, work_dir, pinned)
    except OSError as exc:
        # What the steps above leave unclassified (a full disk as the staging directories
        # are made, no descriptors left to spawn git): a failure of staging, with its code.
        raise FetchFailed(f"staging failed: {exc}", code="stage_failed", transient=True) from None
