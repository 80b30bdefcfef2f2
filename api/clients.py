"""Where a request comes from: the TCP peer, or behind a trusted proxy the address it forwards;
and when it reached the server."""

from __future__ import annotations

import ipaddress
import time
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


def request_arrival(environ: dict[str, Any]) -> float:
    """When the request's first bytes reached this host, on the ``time.monotonic()`` clock: the
    kernel's receive timestamp that our gunicorn worker keeps on the connection
    (config/gunicorn_worker.py), so that a request kept waiting while the worker's event loop
    was busy counts that wait; now when there is none (another server, the test client)."""
    now = time.monotonic()
    arrived_at = getattr(environ.get("gunicorn.socket"), "arrived_at", None)
    if arrived_at is None:
        return now
    return now - min(60.0, max(0.0, time.time() - arrived_at))  # a clock step cannot make it absurd
