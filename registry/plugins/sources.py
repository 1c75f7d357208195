"""Plugin source strings: parsing, normalisation, default names and the allowlist."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from registry.plugins.errors import FetchFailed, InvalidSource, PluginError, SourceDenied

__all__ = [
    "FetchFailed",
    "InvalidSource",
    "PluginError",
    "PluginSource",
    "SourceDenied",
    "SourceSettings",
    "check_allowed",
    "default_plugin_name",
    "parse_source",
    "validate_plugin_name",
]


@dataclass(frozen=True, slots=True)
class PluginSource:
    """A parsed, normalised plugin source.

    ``raw`` is the normalised declaration (``file://<realpath>``,
    ``git+<url>#<ref>``, ``github://owner/repo[/subdir]#<ref>``,
    ``gitea://host/owner/repo[/subdir]#<ref>``); the allowlist is matched against it.
    """

    raw: str
    kind: Literal["file", "git"]
    location: str
    ref: str | None
    subdir: str | None


@dataclass(frozen=True, slots=True)
class SourceSettings:
    github_base: str = "https://github.com"
    gitea_scheme: str = "https"
    allowlist: tuple[str, ...] = ()


_PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Owner and repository names as the forges allow them; a leading dot or dash is refused
# so nothing can look like a hidden path or an option.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SUBDIR_SEGMENT_RE = re.compile(r"[A-Za-z0-9._@+-]{1,255}")
_HOST_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)
_USERINFO_RE = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:]+")
# scp-like ssh syntax (user@host:path); both user and host must start with an alphanumeric
# so neither can be mistaken for an ssh option.
_SCP_RE = re.compile(
    r"(?P<user>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):"
    r"(?P<path>[A-Za-z0-9._~/+-]+)"
)
_SHA_RE = re.compile(r"[0-9a-fA-F]{40}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\#]")
_GIT_URL_SCHEMES = frozenset({"file", "git", "http", "https", "ssh"})
_MAX_SOURCE_LEN = 4096


def _invalid(message: str) -> InvalidSource:
    return InvalidSource(message)


def is_commit_sha(ref: str) -> bool:
    """True for a full 40-hex object name (taken as a commit without asking the remote)."""
    return _SHA_RE.fullmatch(ref) is not None


def _validate_ref(ref: str) -> str:
    # Mirrors `git check-ref-format` plus a refusal of anything option-like: the ref ends
    # up as an argument of git commands, so a leading '-' must never get through.
    if not ref or len(ref) > 255:
        raise _invalid("git ref must be 1-255 characters")
    if is_commit_sha(ref):
        return ref.lower()
    if (
        ref.startswith(("-", "/", "."))
        or ref.endswith(("/", ".", ".lock"))
        or ".." in ref
        or "//" in ref
        or "@{" in ref
        or ref == "@"
        or _REF_FORBIDDEN_RE.search(ref)
    ):
        raise _invalid(f"invalid git ref {ref!r}")
    for component in ref.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            raise _invalid(f"invalid git ref {ref!r}")
    return ref


def _validate_subdir(segments: list[str]) -> str | None:
    if not segments:
        return None
    for segment in segments:
        if segment in ("", ".", "..") or not _SUBDIR_SEGMENT_RE.fullmatch(segment):
            raise _invalid(f"invalid subdirectory segment {segment!r}")
    return "/".join(segments)


def _split_ref(rest: str) -> tuple[str, str]:
    body, sep, ref = rest.partition("#")
    if not sep:
        return body, "HEAD"
    return body, _validate_ref(ref)


def _check_segment(value: str, what: str) -> str:
    if not _SEGMENT_RE.fullmatch(value):
        raise _invalid(f"invalid {what} {value!r}")
    return value


def _strip_dot_git(repo: str) -> str:
    name = repo.removesuffix(".git")
    if not name:
        raise _invalid("repository name is empty")
    return _check_segment(name, "repository name")


def _normalise_path(path: str) -> str:
    # realpath, not normpath: the allowlist must see where the data really lives, so
    # neither '..' nor a symlinked directory can smuggle a path under an allowed prefix.
    return os.path.realpath(path)


def _normalise_host(netloc: str) -> str:
    userinfo, at, hostport = netloc.rpartition("@")
    hostport = hostport.lower()
    if not _HOST_RE.fullmatch(hostport):
        raise _invalid(f"invalid host {hostport!r}")
    if at:
        if not _USERINFO_RE.fullmatch(userinfo) or userinfo.startswith("-"):
            raise _invalid("invalid user part in git URL")
        return f"{userinfo}@{hostport}"
    return hostport


def _check_url_path_segments(path: str) -> None:
    # git and curl collapse dot segments (also percent-encoded ones), which would let
    # https://host/allowed/../other pass a prefix check and fetch 'other'.
    for segment in path.split("/"):
        if unquote(segment) in (".", ".."):
            raise _invalid("dot segments are not allowed in git URLs")


def _normalise_git_url(url: str) -> str:
    if not url:
        raise _invalid("git URL is empty")
    if url.startswith("-") or "\\" in url or any(ch.isspace() for ch in url):
        raise _invalid("invalid git URL")
    if "://" not in url:
        match = _SCP_RE.fullmatch(url)
        if match is None:
            raise _invalid("git URL needs a scheme (file, git, http, https, ssh) or user@host:path")
        _check_url_path_segments(match["path"])
        return f"{match['user']}@{match['host'].lower()}:{match['path']}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise _invalid(f"invalid git URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _GIT_URL_SCHEMES:
        raise _invalid(f"unsupported git URL scheme {scheme!r}")
    if parts.query or parts.fragment:
        raise _invalid("git URLs may not carry a query or fragment")
    if scheme == "file":
        if parts.netloc:
            raise _invalid("file git URLs must be file:///absolute/path")
        if "%" in parts.path or not parts.path.startswith("/"):
            raise _invalid("file git URLs must be file:///absolute/path")
        return "file://" + _normalise_path(parts.path)
    netloc = _normalise_host(parts.netloc)
    if parts.path in ("", "/"):
        raise _invalid("git URL names no repository")
    _check_url_path_segments(parts.path)
    return f"{scheme}://{netloc}{parts.path}"


def _parse_file(raw: str) -> PluginSource:
    path = raw.removeprefix("file://")
    if not path.startswith("/"):
        raise _invalid("file sources must be file:///absolute/dir")
    if "#" in path:
        raise _invalid("file sources take no #ref")
    location = _normalise_path(path)
    return PluginSource(
        raw=f"file://{location}", kind="file", location=location, ref=None, subdir=None
    )


def _parse_git(raw: str) -> PluginSource:
    body, ref = _split_ref(raw.removeprefix("git+"))
    url = _normalise_git_url(body)
    return PluginSource(raw=f"git+{url}#{ref}", kind="git", location=url, ref=ref, subdir=None)


def _parse_github(raw: str, settings: SourceSettings) -> PluginSource:
    body, ref = _split_ref(raw.removeprefix("github://"))
    segments = body.split("/")
    if len(segments) < 2:
        raise _invalid("github sources are github://owner/repo[/subdir]#ref")
    owner = _check_segment(segments[0], "owner")
    repo = _strip_dot_git(segments[1])
    subdir = _validate_subdir(segments[2:])
    base = settings.github_base.rstrip("/")
    shown = f"github://{owner}/{repo}" + (f"/{subdir}" if subdir else "") + f"#{ref}"
    return PluginSource(
        raw=shown, kind="git", location=f"{base}/{owner}/{repo}.git", ref=ref, subdir=subdir
    )


def _parse_gitea(raw: str, settings: SourceSettings) -> PluginSource:
    body, ref = _split_ref(raw.removeprefix("gitea://"))
    segments = body.split("/")
    if len(segments) < 3:
        raise _invalid("gitea sources are gitea://host/owner/repo[/subdir]#ref")
    host = segments[0].lower()
    if not _HOST_RE.fullmatch(host) or host.startswith("["):
        raise _invalid(f"invalid host {segments[0]!r}")
    owner = _check_segment(segments[1], "owner")
    repo = _strip_dot_git(segments[2])
    subdir = _validate_subdir(segments[3:])
    shown = f"gitea://{host}/{owner}/{repo}" + (f"/{subdir}" if subdir else "") + f"#{ref}"
    location = f"{settings.gitea_scheme}://{host}/{owner}/{repo}.git"
    return PluginSource(raw=shown, kind="git", location=location, ref=ref, subdir=subdir)


def parse_source(raw: str, settings: SourceSettings) -> PluginSource:
    """Parse and normalise a declared source; raises InvalidSource on anything unsupported."""
    if not isinstance(raw, str) or not raw:
        raise _invalid("source is empty")
    if len(raw) > _MAX_SOURCE_LEN or raw != raw.strip() or _CONTROL_RE.search(raw):
        raise _invalid("source contains surrounding whitespace or control characters")
    if raw.startswith("file://"):
        return _parse_file(raw)
    if raw.startswith("git+"):
        return _parse_git(raw)
    if raw.startswith("github://"):
        return _parse_github(raw, settings)
    if raw.startswith("gitea://"):
        return _parse_gitea(raw, settings)
    raise _invalid("unsupported source; use file://, git+<url>, github:// or gitea://")


def default_plugin_name(source: PluginSource) -> str:
    """The last path segment of the source (not validated; see validate_plugin_name)."""
    if source.subdir:
        return source.subdir.rsplit("/", 1)[-1]
    if source.kind == "file":
        return os.path.basename(source.location.rstrip("/"))
    location = source.location
    path = urlsplit(location).path if "://" in location else location.split(":", 1)[-1]
    return path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")


def validate_plugin_name(name: str) -> str:
    """Return ``name`` if it is safe as a single directory name, else raise InvalidSource."""
    if not isinstance(name, str) or not _PLUGIN_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidSource(f"invalid plugin name {name!r}", code="invalid_plugin_name")
    return name


def _normalise_entry(entry: str) -> str:
    # Entries get the same normalisation as sources so that an allowed directory that is
    # itself reached through a symlink still matches; the trailing slash is meaningful.
    for scheme in ("file://", "git+file://"):
        if entry.startswith(scheme):
            path, sep, ref = entry.removeprefix(scheme).partition("#")
            if not path.startswith("/"):
                return entry
            norm = _normalise_path(path)
            if path.endswith("/") and norm != "/":
                norm += "/"
            return f"{scheme}{norm}{sep}{ref}"
    return entry


def _prefix_matches(prefix: str, candidate: str) -> bool:
    if not prefix:
        return False
    if prefix.endswith("/"):
        return candidate.startswith(prefix)
    if candidate == prefix:
        return True
    return candidate.startswith(prefix) and candidate[len(prefix)] in "/#"


def check_allowed(source: PluginSource, settings: SourceSettings) -> None:
    """Raise SourceDenied unless the normalised source matches an allowlist entry."""
    # Re-derive everything from the declaration so a PluginSource whose location was
    # edited (or loaded from somewhere untrusted) cannot fetch from somewhere its
    # allowlisted declaration does not point to.
    try:
        reparsed = parse_source(source.raw, settings)
    except InvalidSource as exc:
        raise SourceDenied(f"source cannot be verified: {exc.message}") from None
    if (reparsed.kind, reparsed.location, reparsed.ref, reparsed.subdir) != (
        source.kind,
        source.location,
        source.ref,
        source.subdir,
    ):
        raise SourceDenied("source fields do not match its declaration")
    entries = [entry.strip() for entry in settings.allowlist]
    if "*" in entries:
        return
    candidate = reparsed.raw
    for entry in entries:
        if _prefix_matches(_normalise_entry(entry), candidate):
            return
    raise SourceDenied(f"source {candidate!r} is not in the plugin allowlist")
