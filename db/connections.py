"""PostgreSQL's connection limit and how much of it is in use (for /ops/pool_health)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection


@dataclass(frozen=True)
class ConnectionUse:
    """Server-wide connection figures; ``headroom`` is what ordinary roles can still open."""

    max_connections: int
    reserved_connections: int
    in_use: int
    in_use_by_nexmdm: int

    @property
    def available(self) -> int:
        """Connections ordinary roles may hold at most (max_connections minus the reserved)."""
        return max(0, self.max_connections - self.reserved_connections)

    @property
    def headroom(self) -> int:
        return self.available - self.in_use


def connection_use(conn: Connection, application_prefix: str = "nexmdm") -> ConnectionUse:
    """max_connections, reserved slots, and client connections in use (this one excluded)."""
    row = conn.exec_driver_sql(
        """
        SELECT current_setting('max_connections')::int,
               current_setting('superuser_reserved_connections')::int
                 + COALESCE(current_setting('reserved_connections', true), '0')::int,
               count(*) FILTER (WHERE a.backend_type = 'client backend'),
               count(*) FILTER (WHERE a.backend_type = 'client backend'
                                  AND a.application_name LIKE %(prefix)s)
          FROM pg_stat_activity a
         WHERE a.pid <> pg_backend_pid()
        """,
        {"prefix": application_prefix + "%"},
    ).one()
    return ConnectionUse(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def backend_pid(conn: Connection) -> int:
    """The process id of this connection's PostgreSQL backend (a child of the postmaster)."""
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
