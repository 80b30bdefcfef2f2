"""Engine and pool construction, and where the database URL comes from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.pool import Pool, QueuePool

from config.settings import Settings
from db.embedded import EmbeddedCluster
from db.errors import translated_faults


def embedded_cluster(settings: Settings) -> EmbeddedCluster:
    """The embedded cluster of this checkout (``var/pg``)."""
    return EmbeddedCluster(settings.var_dir / "pg")


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL if set, else the embedded cluster's URL (started if it is not running)."""
    if settings.database_url:
        return settings.database_url
    return embedded_cluster(settings).start()


@contextlib.contextmanager
def database_url_for_cli(settings: Settings) -> Iterator[str]:
    """For command-line tools: the URL to use, stopping the embedded cluster afterwards
    only when this call was the one that started it."""
    if settings.database_url:
        yield settings.database_url
        return
    cluster = embedded_cluster(settings)
    was_running = cluster.initialized() and cluster.running()
    url = cluster.start()
    try:
        yield url
    finally:
        if not was_running:
            cluster.stop()


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the psycopg2 driver named (SQLAlchemy 2.1 defaults to psycopg 3).

    A libpq multi-host URL (``postgresql://u:pw@h1:5432,h2:5432/db?target_session_attrs=read-write``,
    how the API finds the primary after a failover) becomes the query form SQLAlchemy parses,
    ``postgresql+psycopg2://u:pw@/db?host=h1,h2&port=5432,5432&...``; libpq sees the same hosts."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + _multi_host_as_query(url[len(prefix):])
    return url


def _multi_host_as_query(rest: str) -> str:
    """``user@h1:p1,h2:p2/db?q`` -> ``user@/db?host=h1,h2&port=p1,p2&q``; anything else unchanged."""
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if "," not in hostlist:
        return rest
    hosts, ports = [], []
    for item in hostlist.split(","):
        host, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not colon:
            host, port = item, "5432"
        hosts.append(host.removeprefix("[").removesuffix("]"))  # libpq takes bare IPv6 addresses
        ports.append(port or "5432")
    path, question, query = tail.partition("?")
    params = f"host={','.join(hosts)}&port={','.join(ports)}"
    return f"{userinfo}{at}/{path}?{params}{'&' + query if query else ''}"


def make_engine(
    settings: Settings, url: str | None = None, *, application_name: str = "nexmdm",
    pool_class: type[Pool] = QueuePool,
) -> Engine:
    """The pooled engine of one process. Create it after gunicorn forks, never before.

    ``pool_class``: a QueuePool subclass (the API passes one that publishes pool metrics)."""
    url = url or settings.database_url
    if not url:
        raise ValueError("make_engine needs a database URL (resolve_database_url first)")
    return create_engine(
        sqlalchemy_url(url),
        poolclass=pool_class,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_recycle=1800,
        # No pre-ping: it costs a round trip per checkout on the hot path. A dead connection
        # is detected on use; SQLAlchemy then invalidates the pool and the caller answers 503.
        pool_pre_ping=False,
        connect_args={
            "application_name": application_name,
            "connect_timeout": 5,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms} -c timezone=UTC",
        },
    )


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for reads, in autocommit: each statement runs alone, so a read is one
    round trip to PostgreSQL instead of three (BEGIN, the query, ROLLBACK). Under load every
    round trip waits for the database process to get a core, so this is most of a fast read's
    latency. Not for writes that must commit together. Driver faults become domain errors.

    Autocommit is switched on the driver's connection, not with SQLAlchemy's
    ``isolation_level="AUTOCOMMIT"``: that one resets the level when the connection goes back to
    the pool with a ``SET default_transaction_isolation`` round trip, doubling a read's trips.
    psycopg2's ``autocommit`` is client-side (it only decides whether a BEGIN is sent)."""
    with translated_faults(), engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        driver.autocommit = True
        try:
            yield conn
        finally:
            if not driver.closed:
                driver.autocommit = False


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in one transaction, committed when the block ends without an error
    (``engine.begin()``); driver faults become domain errors (db.errors.domain_error)."""
    with translated_faults(), engine.begin() as conn:
        yield conn
