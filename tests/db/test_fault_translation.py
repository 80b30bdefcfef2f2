"""db.errors.domain_error: the one mapping from driver and pool faults to domain errors."""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import errors as pg_errors
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from db.errors import DatabaseUnavailable, DeviceNotFound, PoolExhausted, domain_error, translated_faults


def test_pool_timeout_is_pool_exhausted():
    error = domain_error(PoolTimeout("QueuePool limit reached"))
    assert isinstance(error, PoolExhausted) and isinstance(error, DatabaseUnavailable)
    assert error.code == "pool_exhausted" and error.retry_after_s == 1


@pytest.mark.parametrize("fault", [
    psycopg2.OperationalError("could not connect to server"),  # a raw connection's own error
    OperationalError("SELECT 1", {}, psycopg2.OperationalError("server closed the connection")),
    psycopg2.InterfaceError("connection already closed"),
    InterfaceError("SELECT 1", {}, psycopg2.InterfaceError("connection already closed")),
])
def test_unreachable_database_is_database_unavailable(fault):
    error = domain_error(fault)
    assert type(error) is DatabaseUnavailable
    assert error.code == "database_unavailable" and error.retry_after_s == 2


def test_a_constraint_is_no_outage():
    assert domain_error(IntegrityError("INSERT", {}, pg_errors.UniqueViolation("duplicate key"))) is None
    assert domain_error(pg_errors.CheckViolation("no partition of relation")) is None


def test_translated_faults_raises_the_domain_error_and_lets_the_rest_through():
    with pytest.raises(PoolExhausted):
        with translated_faults():
            raise PoolTimeout("QueuePool limit reached")
    with pytest.raises(IntegrityError):
        with translated_faults():
            raise IntegrityError("INSERT", {}, pg_errors.UniqueViolation("duplicate key"))
    with pytest.raises(DeviceNotFound):
        with translated_faults():
            raise DeviceNotFound(1)
