"""Raw-socket clients for the limits suite: heads and bodies sent in pieces, answers read as
bytes, connections reset (not closed) like a client that vanishes, and a process's RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from tests.processes import RegistryProcess
from tests.support import ADMIN

ANSWER_WITHIN_S = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """API.md's envelope, checked."""
        assert self.headers["content-type"].startswith("application/json"), self
        parsed = json.loads(self.body)
        assert set(parsed) == {"error"}, parsed
        error: dict[str, Any] = parsed["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), error
        return error


def port_of(registry: RegistryProcess) -> int:
    return int(registry.url.rsplit(":", 1)[1])


def head(method: str, path: str, fields: list[tuple[str, str]], length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: registry", *(f"{n}: {v}" for n, v in fields)]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def padding(total_bytes: int, fields: int) -> list[tuple[str, str]]:
    """`fields` header fields of about `total_bytes` together."""
    each = max(1, total_bytes // fields - 12)
    return [(f"X-Pad-{i}", "p" * each) for i in range(fields)]


class Connection:
    # Every connection opened, closed at the end of the test (`close_all`): an assertion in the
    # middle of one leaves none open.
    opened: ClassVar[list[Connection]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = cls(reader, writer)
        cls.opened.append(connection)
        return connection

    @classmethod
    async def close_all(cls) -> None:
        opened, cls.opened = cls.opened, []
        for connection in opened:
            connection.close()
        for connection in opened:
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        """One response: status line, headers, and a Content-Length body."""
        raw_head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN_S)
        status_line, *lines = raw_head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(
            self.reader.readexactly(int(headers.get("content-length", "0"))), ANSWER_WITHIN_S
        )
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        """After an answer: the server closes the connection (EOF, or a reset)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), ANSWER_WITHIN_S)
        except ConnectionResetError:
            return True
        return rest == b""

    def reset(self) -> None:
        """Vanish: SO_LINGER 0 makes close() send a RST, as a killed client's kernel does."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


async def exchange(port: int, request: bytes) -> Answer:
    connection = await Connection.open(port)
    try:
        await connection.send(request)
        return await connection.answer()
    finally:
        connection.close()


async def workspace_token(registry: RegistryProcess) -> tuple[str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{registry.url}/workspaces", json={"name": "w"}, headers=ADMIN) as created,
    ):
        assert created.status == 201
        body = await created.json()
    return body["workspace"]["id"], body["token"]


async def metric(registry: RegistryProcess, name: str, labels: str = "") -> float:
    """One sample of /metrics (0 when absent), e.g. metric(r, "registry_turned_away_total",
    'reason="connections"')."""
    async with aiohttp.ClientSession() as session, session.get(f"{registry.url}/metrics") as got:
        got.raise_for_status()  # a 503 of the connection cap is not a scrape
        text = await got.text()
    selector = re.escape(name + (f"{{{labels}}}" if labels else ""))
    found = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def until_metric(
    registry: RegistryProcess, name: str, at_least: float, within_s: float = 20.0
) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (value := await metric(registry, name)) < at_least:
        assert asyncio.get_running_loop().time() < deadline, f"{name} stayed at {value}"
        await asyncio.sleep(0.05)


async def until_metric_at_most(
    registry: RegistryProcess, name: str, at_most: float, within_s: float = 20.0
) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (value := await metric(registry, name)) > at_most:
        assert asyncio.get_running_loop().time() < deadline, f"{name} stayed at {value}"
        await asyncio.sleep(0.05)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")
