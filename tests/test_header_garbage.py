"""Requests aiohttp's parser refuses (registry/protocol.py): the JSON envelope, one info line,
and never the header's value in any log."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from registry.protocol import LOG_EVERY_S, REFUSALS, EnvelopeAppRunner
from registry.startup import stand_in
from tests.processes import start_registry

SECRET = "rwt_SECRETsecret0123456789abcdefGHIJ"


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def garbage(header: str) -> bytes:
    return f"GET /healthz HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode("latin-1")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    runner = EnvelopeAppRunner(stand_in(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


@pytest.mark.parametrize(
    "header",
    [
        f"Authorization: Bearer {SECRET}\x01",
        f"X-Probe: a\x01b{SECRET}",
        f"X-Probe: {SECRET}\x7f",
        f"X-{SECRET}\x00: value",
    ],
)
async def test_a_control_character_in_a_header_gets_the_envelope_and_no_secret_is_logged(
    port: int, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    REFUSALS._last = float("-inf")  # the rate limit starts afresh
    caplog.set_level(logging.DEBUG)

    status, headers, body = await raw_exchange(port, garbage(header))

    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert SECRET not in body.decode("latin-1")
    refused = [r for r in caplog.records if r.name == "registry.protocol"]
    assert [r.levelno for r in refused] == [logging.INFO]
    assert all(r.levelno < logging.WARNING for r in caplog.records), caplog.text
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert record.exc_info is None
    assert SECRET not in caplog.text


async def test_a_flood_of_garbage_is_logged_once_per_interval(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    REFUSALS._last = float("-inf")
    caplog.set_level(logging.INFO, logger="registry.protocol")

    for _ in range(5):
        status, _, _ = await raw_exchange(port, garbage("X-Probe: a\x01b"))
        assert status == 400

    lines = [r for r in caplog.records if r.name == "registry.protocol"]
    assert len(lines) == 1, f"more than one line within {LOG_EVERY_S} s"


async def test_serve_answers_header_garbage_with_the_envelope_and_keeps_the_token_out_of_its_log(
    dsn: str, tmp_path: Path
) -> None:
    process = start_registry(dsn, tmp_path, env={"REGISTRY_LOG_LEVEL": "debug"})
    try:
        await process.wait_healthy()
        port = int(process.url.rsplit(":", 1)[1])

        status, headers, body = await raw_exchange(
            port, garbage(f"Authorization: Bearer {SECRET}\x01")
        )

        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"]["code"] == "bad_request"
    finally:
        process.stop()
    log = process.log()
    assert "refused a malformed HTTP request" in log
    assert SECRET not in log
    assert "Traceback" not in log
