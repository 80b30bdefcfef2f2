"""DATABASE_URL forms the engine accepts, including libpq's multi-host URL (failover)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from db.engine import sqlalchemy_url


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://u:pw@db:5432/nexmdm", "postgresql+psycopg2://u:pw@db:5432/nexmdm"),
    ("postgres://u@db/nexmdm", "postgresql+psycopg2://u@db/nexmdm"),
    ("postgresql://u:pw@h1:5432,h2:5433/nexmdm?target_session_attrs=read-write",
     "postgresql+psycopg2://u:pw@/nexmdm?host=h1,h2&port=5432,5433&target_session_attrs=read-write"),
    ("postgresql://u@h1,h2/nexmdm", "postgresql+psycopg2://u@/nexmdm?host=h1,h2&port=5432,5432"),
    ("postgresql://u@[::1]:5432,[fd00::2]/nexmdm",
     "postgresql+psycopg2://u@/nexmdm?host=::1,fd00::2&port=5432,5432"),
    ("postgresql://u@/nexmdm?host=h1,h2&port=1,2", "postgresql+psycopg2://u@/nexmdm?host=h1,h2&port=1,2"),
])
def test_sqlalchemy_url(url: str, expected: str) -> None:
    assert sqlalchemy_url(url) == expected


def test_multi_host_url_reaches_libpq_as_host_and_port_lists() -> None:
    engine = create_engine(sqlalchemy_url(
        "postgresql://nexmdm:s%40cret@10.0.0.1:5432,10.0.0.2:5432/nexmdm?target_session_attrs=read-write"))
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    assert kwargs == {"dbname": "nexmdm", "user": "nexmdm", "password": "s@cret", "host": "10.0.0.1,10.0.0.2",
                      "port": "5432,5432", "target_session_attrs": "read-write"}
