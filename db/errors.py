"""Domain errors raised by the data layer, and the one place driver faults become them.

``domain_error`` maps a driver or pool fault (SQLAlchemy's or psycopg2's own exception) to a
domain error; ``translated_faults`` applies it at the data layer's edge (reads, transactions,
the heartbeat writer). api/errors.py maps only these domain errors to HTTP answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg2
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout


class DataError(Exception):
    """Base of every data-layer error."""


class DeviceNotFound(DataError):
    def __init__(self, device_id: int | str) -> None:
        super().__init__(f"device {device_id} not found")
        self.device_id = device_id


class WebhookNotFound(DataError):
    def __init__(self, webhook_id: int) -> None:
        super().__init__(f"no webhook {webhook_id}")
        self.webhook_id = webhook_id


class DuplicateDevice(DataError):
    def __init__(self, device_uids: list[str]) -> None:
        super().__init__(f"device_uid already enrolled: {', '.join(device_uids[:10])}")
        self.device_uids = device_uids


class DatabaseUnavailable(DataError):
    """The database cannot be reached (or answered too late); worth a retry later."""

    code = "database_unavailable"

    def __init__(self, detail: str, retry_after_s: int = 2) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class PoolExhausted(DatabaseUnavailable):
    """No pooled connection freed up within DB_POOL_TIMEOUT_S; worth a retry shortly."""

    code = "pool_exhausted"


class QueryTimeout(DatabaseUnavailable):
    """A statement or lock timeout: the database is up, one statement waited or ran too long
    (``code`` statement_timeout or lock_timeout). Not an outage: no connection is replaced. A
    DatabaseUnavailable only so that every path that answers "retry later" treats it alike."""

    def __init__(self, code: str, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, retry_after_s)
        self.code = code


def query_timeout_of(exc: BaseException) -> QueryTimeout | None:
    """The QueryTimeout a driver error (or SQLAlchemy's wrapper of one) stands for, else None.

    psycopg2 files both under OperationalError, like a lost connection; told apart by SQLSTATE:
    57014 query_canceled (statement_timeout), 55P03 lock_not_available (lock_timeout)."""
    code = getattr(getattr(exc, "orig", None) or exc, "pgcode", None)
    if code == "57014":
        return QueryTimeout("statement_timeout", "a database statement took too long (statement_timeout)")
    if code == "55P03":
        return QueryTimeout("lock_timeout", "a database lock was not granted in time (lock_timeout)")
    return None


class Overloaded(DataError):
    """The server sheds load (ingest queue full, event loop late); worth a retry later."""

    code = "overloaded"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


# What the driver and the pool raise; anything of these that domain_error does not map is a bug.
DRIVER_FAULTS: tuple[type[Exception], ...] = (SQLAlchemyError, psycopg2.Error)


def domain_error(exc: BaseException) -> DataError | None:
    """The domain error a driver or pool fault means, or None when it means no outage (a bug,
    a constraint): those propagate as they are."""
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, PoolTimeout):
        return PoolExhausted("no database connection free in time", retry_after_s=1)
    # SQLAlchemy wraps the driver's error; a raw DBAPI connection (the heartbeat writer's, a
    # pool's connect) raises the driver's own.
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    timeout = query_timeout_of(exc)
    if timeout is not None:  # before OperationalError, of which psycopg2 makes it a kind
        return timeout
    if isinstance(exc, OperationalError) or isinstance(orig, psycopg2.OperationalError):
        return DatabaseUnavailable("the database cannot be reached", retry_after_s=2)
    if (isinstance(exc, DBAPIError) and exc.connection_invalidated) or isinstance(orig, psycopg2.InterfaceError):
        return DatabaseUnavailable("the database connection was lost", retry_after_s=2)
    return None


@contextlib.contextmanager
def translated_faults() -> Iterator[None]:
    """Re-raise a driver or pool fault raised inside as its domain error (see domain_error)."""
    try:
        yield
    except DRIVER_FAULTS as exc:
        error = domain_error(exc)
        if error is None:
            raise
        raise error from exc


def fault_summary(exc: BaseException) -> str:
    """One line saying what a fault was, for a log line or a status field: the driver's own
    first line when a domain error wraps one (it says more), else the error's, else its type."""
    if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
