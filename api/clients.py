"""Where a request comes from: the TCP peer, or behind a trusted proxy the address it forwards."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def parse_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated addresses or CIDR blocks (TRUSTED_PROXIES); ValueError names a bad one."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {part!r}") from None
    return tuple(out)


def _trusted(addr: str, trusted: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(environ: dict[str, Any], trusted: Networks) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy. A client cannot
    choose its address by sending the header: it is read only from trusted peers."""
    peer = environ.get("REMOTE_ADDR") or ""
    if not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        if not hop:
            continue
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a garbled header: the proxy is all we know
        if not _trusted(hop, trusted):
            return hop
    return peer
