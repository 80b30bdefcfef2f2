"""Which concurrency model this process runs under."""

from __future__ import annotations

from gevent import monkey


def gevent_active() -> bool:
    """True when the process runs under gevent's monkey-patching (gunicorn -k gevent)."""
    return bool(monkey.is_module_patched("socket"))
