"""Which concurrency model this process runs under."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gevent import monkey

T = TypeVar("T")


def gevent_active() -> bool:
    """True when the process runs under gevent's monkey-patching (gunicorn -k gevent)."""
    return bool(monkey.is_module_patched("socket"))


def run_blocking(fn: Callable[[], T]) -> T:
    """``fn()``, in gevent's thread pool when under gevent: a long call into C (a DuckDB query)
    then leaves the worker's event loop free for heartbeats; returns or raises what fn does."""
    if gevent_active():
        import gevent

        return gevent.get_hub().threadpool.apply(fn)
    return fn()
