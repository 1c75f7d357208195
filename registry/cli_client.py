"""The operator CLI's HTTP calls: one method per API route it uses, errors as exceptions."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

JSON = dict[str, Any]

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
# The server sends a keepalive comment every 15 s; silence for much longer means a dead link.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=45)
MAX_RECONNECT_DELAY_S = 30.0


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class ClientError(Exception):
    """Anything that stops a command; `str()` is the message for the operator."""


class ApiError(ClientError):
    """The API answered with its error envelope (or, failing that, a bare status)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class Unreachable(ClientError):
    """No HTTP answer at all: refused, unresolvable, timed out."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: int | None
    kind: str
    data: JSON


async def _error_from(response: aiohttp.ClientResponse) -> ApiError:
    try:
        body = await response.json(content_type=None)
        error = body["error"]
        return ApiError(
            response.status, str(error["code"]), str(error["message"]), error.get("field")
        )
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return ApiError(response.status, "http_error", response.reason or "unexpected response")


class Client:
    """An admin-token session against one registry. Use as `async with Client(...) as api`."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use the client as an async context manager"
        return self._session

    def _unreachable(self, exc: BaseException) -> Unreachable:
        if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
            reason = os.strerror(exc.os_error.errno).lower()
        elif isinstance(exc, TimeoutError):
            reason = "no answer in time"
        else:
            reason = str(exc) or type(exc).__name__
        return Unreachable(
            f"cannot reach the registry at {self.base_url}: {reason} "
            "(is it running? set --url or REGISTRY_URL)"
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: JSON | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                json=json,
                params=params,
                timeout=REQUEST_TIMEOUT,
            ) as response:
                if response.status >= 400:
                    raise await _error_from(response)
                if response.status == 204:
                    return None
                return await response.json(content_type=None)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        except ValueError as exc:  # a body that is not JSON: not a registry, or a broken one
            raise ClientError(f"{method} {path}: the answer is not JSON ({exc})") from None

    # Management API.

    async def create_workspace(
        self,
        name: str,
        *,
        plugins: list[JSON],
        delivery: str | None,
        url: str | None,
        labels: dict[str, str] | None = None,
    ) -> JSON:
        body: JSON = {"name": name, "plugins": plugins}
        if labels is not None:
            body["labels"] = labels
        if delivery is not None:
            body["delivery"] = delivery
        if url is not None:
            body["url"] = url
        result: JSON = await self._call("POST", "/workspaces", json=body)
        return result

    async def list_workspaces(
        self,
        *,
        limit: int | None,
        cursor: str | None,
        **filters: str | bool | None,
    ) -> JSON:
        """A page of `GET /workspaces`; `filters` are its query parameters (None: unset)."""
        params = {
            key: _query_value(value)
            for key, value in (*filters.items(), ("limit", limit), ("cursor", cursor))
            if value is not None
        }
        result: JSON = await self._call("GET", "/workspaces", params=params)
        return result

    async def workspace_by_name(self, name: str) -> JSON:
        result: JSON = await self._call("GET", f"/workspaces/by-name/{quote(name, safe='')}")
        return result

    async def change_labels(
        self, workspace_id: str, labels: dict[str, str | None], *, replace: bool
    ) -> JSON:
        """PUT (the whole set) or PATCH (a merge; None removes); the workspace after it."""
        result: JSON = await self._call(
            "PUT" if replace else "PATCH",
            f"/workspaces/{workspace_id}/labels",
            json={"labels": labels},
        )
        return result

    async def get_workspace(self, workspace_id: str) -> JSON:
        result: JSON = await self._call("GET", f"/workspaces/{workspace_id}")
        return result

    async def workspace_action(self, workspace_id: str, action: str) -> JSON:
        """`pause` or `resume`; returns the workspace as it is now."""
        result: JSON = await self._call("POST", f"/workspaces/{workspace_id}/{action}")
        return result

    async def delete_workspace(self, workspace_id: str) -> None:
        await self._call("DELETE", f"/workspaces/{workspace_id}")

    async def event_history(
        self, *, workspace_id: str | None, after: int, limit: int | None
    ) -> list[JSON]:
        """History after `after` (the fleet's, or one workspace's), following pages until
        the end or until `limit` events; each event carries its workspace's name."""
        if workspace_id is not None:
            await self.get_workspace(workspace_id)  # 404 for a workspace that is not there
        page_size = 500 if limit is None else min(500, limit)
        collected: list[JSON] = []
        while limit is None or len(collected) < limit:
            params = {"after": str(after), "limit": str(page_size)}
            if workspace_id is not None:
                params["workspace_id"] = workspace_id
            page: JSON = await self._call("GET", "/events/history", params=params)
            collected.extend(page["events"])
            if page.get("next_after") is None:
                break
            after = int(page["next_after"])
        return collected if limit is None else collected[:limit]

    async def rotate_token(self, workspace_id: str) -> JSON:
        result: JSON = await self._call("POST", f"/workspaces/{workspace_id}/token")
        return result

    async def set_plugins(self, workspace_id: str, plugins: list[JSON]) -> JSON:
        result: JSON = await self._call(
            "PUT", f"/workspaces/{workspace_id}/plugins", json={"plugins": plugins}
        )
        return result

    async def fleet(self) -> JSON:
        result: JSON = await self._call("GET", "/fleet")
        return result

    async def fleet_history(self, minutes: int) -> JSON:
        result: JSON = await self._call("GET", "/fleet/history", params={"minutes": str(minutes)})
        return result

    # Internal reconcile API.

    async def request_reconcile(self, workspace_id: str, *, refresh: bool) -> JSON:
        result: JSON = (
            await self._call(
                "POST", f"/internal/workspaces/{workspace_id}/reconcile", json={"refresh": refresh}
            )
        )["reconcile"]
        return result

    async def get_reconcile(self, reconcile_id: str) -> JSON:
        result: JSON = await self._call("GET", f"/internal/reconciles/{reconcile_id}")
        return result

    async def reconcile_history(self, workspace_id: str, *, limit: int | None) -> list[JSON]:
        params = {} if limit is None else {"limit": str(limit)}
        result: list[JSON] = (
            await self._call(
                "GET", f"/internal/workspaces/{workspace_id}/reconciles", params=params
            )
        )["reconciles"]
        return result

    async def fan_out(self, *, source: str | None, name: str | None) -> JSON:
        body = {"source": source} if source is not None else {"name": name}
        result: JSON = await self._call("POST", "/internal/plugins/reconcile", json=body)
        return result

    # The live stream.

    async def follow_events(
        self,
        *,
        workspace_id: str | None,
        after: int | None,
        notify: Callable[[str], None],
    ) -> AsyncIterator[StreamEvent]:
        """Server-Sent Events from GET /events, for ever; reconnects with Last-Event-ID.

        The first connection must succeed (else Unreachable / ApiError); once the stream has
        been up, drops and restarts of the registry are waited out with backoff. `notify`
        hears about the connection coming up and going down.
        """
        last_id = after
        retry_s = 1.0
        connected_once = False
        failures = 0
        params = {"workspace_id": workspace_id} if workspace_id else None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                async with self.session.get(
                    self.base_url + "/events",
                    params=params,
                    headers=headers,
                    timeout=STREAM_TIMEOUT,
                ) as response:
                    if response.status >= 400:
                        error = await _error_from(response)
                        if response.status != 503 or not connected_once:
                            raise error
                        raise aiohttp.ClientConnectionError(str(error))
                    if not connected_once:
                        notify("following events (Ctrl-C to stop)")
                    connected_once = True
                    failures = 0
                    async for message in _parse_sse(response.content):
                        if message.retry_ms is not None:
                            retry_s = message.retry_ms / 1000
                        if message.id is not None:
                            last_id = message.id
                        if message.data is None:
                            continue
                        try:
                            data = json.loads(message.data)
                        except ValueError:
                            continue
                        if isinstance(data, dict):
                            yield StreamEvent(message.id, message.kind, data)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not connected_once:
                    raise self._unreachable(exc) from None
                failures += 1
                notify(f"event stream dropped ({exc or type(exc).__name__}); reconnecting")
            else:
                failures += 1  # the server ended the stream (restart, shutdown): come back
                notify("event stream ended; reconnecting")
            await asyncio.sleep(min(MAX_RECONNECT_DELAY_S, retry_s * 2 ** max(0, failures - 1)))


@dataclass(slots=True)
class _Message:
    id: int | None = None
    kind: str = "message"
    data: str | None = None
    retry_ms: int | None = None


async def _parse_sse(content: aiohttp.StreamReader) -> AsyncIterator[_Message]:
    """Frames of a text/event-stream: fields up to a blank line; comments skipped."""
    message = _Message()
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data or message.retry_ms is not None or message.id is not None:
                message.data = "\n".join(data) if data else None
                yield message
            message, data = _Message(), []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            message.kind = value
        elif field == "id" and value.isdigit():
            message.id = int(value)
        elif field == "retry" and value.isdigit():
            message.retry_ms = int(value)
