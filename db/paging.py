"""Keyset pagination for the list queries: a WHERE clause built filter by filter, and one page of
rows (fetched with ``LIMIT limit + 1``) with the cursor of the next."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row


class Conditions:
    """The conditions of one WHERE clause and their parameters (``params`` seeds the others)."""

    def __init__(self, **params: Any) -> None:
        self.clauses: list[str] = []
        self.params: dict[str, Any] = params

    def add(self, clause: str, **params: Any) -> None:
        """AND ``clause``, whose %(name)s placeholders ``params`` fill."""
        self.clauses.append(clause)
        self.params.update(params)

    def sql(self) -> str:
        """The clauses joined with AND (TRUE when there is none)."""
        return " AND ".join(self.clauses) or "TRUE"


def keyset_page(
    rows: Sequence[Row | Mapping[str, Any]], limit: int, key: str = "id"
) -> tuple[list[dict[str, Any]], Any | None]:
    """The first ``limit`` rows as dicts, and the ``key`` of the last of them as the next page's
    cursor when the query found more (None on the last page)."""
    page = [dict(r._mapping) if isinstance(r, Row) else dict(r) for r in rows[:limit]]
    return page, (page[-1][key] if len(rows) > limit and page else None)
