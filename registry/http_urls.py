"""The form of a workspace URL the registry accepts: one it can always connect to.

A workspace URL is stored and later used to deliver plugins over HTTP, shown in views and
echoed to every client of the API. Until 2026-12 any string starting with `http://` was taken,
so `http://[` was stored: aiohttp cannot parse it (delivery fails on every attempt) and neither
can `urllib.parse` (it crashed the OpenAPI fuzzer reading it back). The rule is now a regular
expression, the same one the OpenAPI document publishes as the `url` pattern, so a client
generating from the document and the server agree; everything it admits parses with both
`urllib.parse` and yarl and has a host (tests/test_http_urls.py checks that by generation).

RFC 3986's grammar, narrowed where the wider form buys nothing here: a registered name is
dot-separated labels of letters, digits, `_` and `-`; an IP literal is IPv6 without zone or
IPvFuture; the port is 0-65535; path, query and fragment are anything but controls and space.
"""

from __future__ import annotations

import re

_H16 = "[0-9A-Fa-f]{1,4}"
_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986 section 3.2.2's IPv6address, its nine forms in order."""
    forms = [
        f"(?:{_H16}:){{6}}{_LS32}",
        f"::(?:{_H16}:){{5}}{_LS32}",
        f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    ]
    for before, after in ((1, 3), (2, 2), (3, 1)):
        forms.append(f"(?:(?:{_H16}:){{0,{before}}}{_H16})?::(?:{_H16}:){{{after}}}{_LS32}")
    forms += [
        f"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        f"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        f"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    ]
    return "(?:" + "|".join(forms) + ")"


_USERINFO = "(?:(?:[A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})*@)?"
_REG_NAME = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?"
_HOST = rf"(?:{_REG_NAME}|\[{_ipv6()}\])"
_PORT = "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
_REST = r"(?:[/?#][^\u0000-\u0020\u007f]*)?"

# Empty is allowed by the callers' schemas ("keep the stored one"), hence the outer `(?:...)?`.
HTTP_URL_PATTERN = f"^(?:https?://{_USERINFO}{_HOST}{_PORT}{_REST})?$"

_HTTP_URL = re.compile(HTTP_URL_PATTERN)


def is_http_url(value: str) -> bool:
    """Whether `value` is a non-empty workspace URL of the accepted form."""
    return bool(value) and _HTTP_URL.fullmatch(value) is not None
