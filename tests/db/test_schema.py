"""The migrated database has exactly the tables and columns db/models.py documents (names,
types, nullability): the migrations follow the models, not a hand-kept copy of them."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from db.models import Base


def test_migrated_columns_match_the_models(engine):
    dialect = postgresql.dialect()
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            live = {
                name: (type_, nullable)
                for name, type_, nullable in conn.exec_driver_sql(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull "
                    "FROM pg_attribute a WHERE a.attrelid = %(t)s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                    {"t": table.name},
                )
            }
            modelled = {c.name: (c.type.compile(dialect=dialect).lower(), c.nullable) for c in table.columns}
            assert live == modelled, table.name
