"""Workspace URLs: what the published pattern admits, every client can parse and connect to."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.http_urls import HTTP_URL_PATTERN, is_http_url
from tests.test_openapi import load_spec

# Built once (a large regex strategy; see DOCUMENTED_SOURCES in tests/test_openapi.py).
ADMITTED = st.from_regex(HTTP_URL_PATTERN, fullmatch=True).filter(lambda url: url != "")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=ADMITTED)
def test_every_url_the_pattern_admits_parses_with_a_host(url: str) -> None:
    """urllib.parse (what most clients and the OpenAPI fuzzer use) and yarl (what aiohttp,
    and so plugin delivery, uses) both parse it, find a host and a valid port."""
    assert is_http_url(url)
    split = urlsplit(url)
    assert split.hostname
    assert split.port is None or 0 <= split.port <= 65535
    parsed = yarl.URL(url)
    assert parsed.host
    assert parsed.port is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "https://agent.example",
        "http://10.0.0.7:8000",
        "http://127.0.0.1:9/",
        "http://[::1]:8080/runtime",
        "http://[2001:db8::ffff:192.0.2.1]",
        "http://user:p%40ss@box.internal:65535/a?b=c#d",
        "http://workspace_1.svc.cluster.local./plugins/ü",
    ],
)
def test_urls_runtimes_use_are_accepted(url: str) -> None:
    assert is_http_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://",
        "http:///path",
        "http://[",
        "http://[:]",
        "http://[1.2.3.4]",
        "http://h:99999",
        "http://h:x",
        "http://a b",
        "http://h/a b",
        "http://h/\t",
        "http://%zz",
        "http://@",
        "HTTP://h",
        "ftp://h",
        "http://\uff03",
    ],
)
def test_urls_no_client_could_connect_to_are_refused(url: str) -> None:
    assert not is_http_url(url)


def test_the_document_publishes_the_pattern_the_server_checks() -> None:
    spec = load_spec()
    schemas = spec["components"]["schemas"]
    urls = [schema["properties"]["url"] for schema in schemas.values() if _has_url_pattern(schema)]
    assert len(urls) == 2
    assert all(url["pattern"] == HTTP_URL_PATTERN for url in urls)


def _has_url_pattern(schema: dict[str, object]) -> bool:
    properties = schema.get("properties")
    return isinstance(properties, dict) and "pattern" in properties.get("url", {})
