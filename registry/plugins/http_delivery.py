"""Delivery over HTTP: the staged tree as a gzip tarball PUT to the workspace runtime."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

import aiohttp

from registry.plugins.errors import FetchFailed


def _tarball(root: Path) -> bytes:
    # Staging already refused symlinks and escapes; the tarball holds regular files and
    # directories only, with paths relative to the plugin root.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            archive.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buffer.getvalue()


async def deliver_over_http(
    session: aiohttp.ClientSession,
    *,
    workspace_url: str,
    name: str,
    tree: Path,
    sha: str,
    timeout_s: float,
) -> None:
    """PUT the plugin to `<workspace_url>/plugins/<name>`; 2xx means the runtime has it."""
    try:
        body = await asyncio.to_thread(_tarball, tree)
    except OSError as exc:
        raise FetchFailed(
            f"packing plugin {name!r} failed: {exc}", code="delivery_failed", transient=True
        ) from None
    headers = {"Content-Type": "application/gzip", "X-Plugin-Sha": sha}
    await _send(session, "PUT", _plugin_url(workspace_url, name), body, headers, timeout_s)


async def remove_over_http(
    session: aiohttp.ClientSession, *, workspace_url: str, name: str, timeout_s: float
) -> None:
    """DELETE `<workspace_url>/plugins/<name>`; 2xx or 404 (already gone) means removed."""
    await _send(session, "DELETE", _plugin_url(workspace_url, name), None, {}, timeout_s)


def _plugin_url(workspace_url: str, name: str) -> str:
    return f"{workspace_url.rstrip('/')}/plugins/{name}"


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout_s: float,
) -> None:
    try:
        async with session.request(
            method,
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            if 200 <= response.status < 300 or (method == "DELETE" and response.status == 404):
                return
            # A runtime that is busy or broken may recover; one that refuses the plugin won't.
            transient = response.status >= 500 or response.status in (408, 429)
            raise FetchFailed(
                f"runtime answered {response.status} to {method} {url}",
                code="delivery_failed" if transient else "delivery_rejected",
                transient=transient,
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchFailed(
            f"could not reach the runtime at {url}: {type(exc).__name__}: {exc}",
            code="delivery_failed",
            transient=True,
        ) from exc
