"""The scheme a browser used, behind a TLS-terminating proxy: X-Forwarded-Proto is believed
only from a peer listed in REGISTRY_TRUSTED_PROXIES (off by default), never from anyone else,
since any client can send the header."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from registry.keys import SETTINGS
from registry.settings import Network, parse_networks


def _trusted(peer: str | None, networks: tuple[Network, ...]) -> bool:
    if peer is None or not networks:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return any(address in network for network in networks)


def request_scheme(request: web.Request) -> str:
    """`https` or `http`: the proxy's X-Forwarded-Proto when the peer is a trusted proxy (the
    last value: the one that proxy appended), else how this connection itself came in."""
    networks = parse_networks(request.app[SETTINGS].trusted_proxies)
    if _trusted(request.remote, networks):
        forwarded = request.headers.get("X-Forwarded-Proto", "")
        proto = forwarded.rsplit(",", 1)[-1].strip().lower()
        if proto in ("http", "https"):
            return proto
    return request.scheme
