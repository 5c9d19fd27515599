"""What a database's schema is, read from its own catalog, as plain data two
databases can be compared by: tables and columns (type, nullability,
default), indexes with their predicates, triggers and functions."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

Catalog = dict[str, Any]


def _squeeze(text: str | None) -> str | None:
    """Whitespace does not make two schemas differ."""
    return None if text is None else re.sub(r"\s+", " ", text).strip()


_PG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type,
               character_maximum_length, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, ordinal_position
    """,
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY indexname
    """,
    "triggers": """
        SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger AS t
        JOIN pg_class AS c ON c.oid = t.tgrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal AND n.nspname = 'public' ORDER BY tgname
    """,
    "functions": """
        SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               p.prosrc
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' ORDER BY p.proname
    """,
    "sequences": """
        SELECT sequence_name, data_type FROM information_schema.sequences
        WHERE sequence_schema = 'public' ORDER BY sequence_name
    """,
}


async def catalog(url: str) -> Catalog:
    """The schema of the database at `url` (the store's own tables only)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            if url.startswith("postgresql"):
                return {
                    name: [tuple(_squeeze(v) if isinstance(v, str) else v for v in row)
                           for row in await conn.execute(sa.text(query))]
                    for name, query in _PG_QUERIES.items()
                }  # fmt: skip
            return await _sqlite_catalog(conn)
    finally:
        await engine.dispose()


async def _sqlite_catalog(conn: Any) -> Catalog:
    objects = list(
        await conn.execute(
            sa.text(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
            )
        )
    )
    columns = {}
    for kind, name, _table, _sql in objects:
        if kind == "table":
            rows = await conn.execute(sa.text(f'PRAGMA table_info("{name}")'))
            columns[name] = [tuple(r) for r in rows]
    return {
        "columns": columns,
        "indexes": [(n, t, _squeeze(s)) for k, n, t, s in objects if k == "index"],
        "triggers": [(n, t, _squeeze(s)) for k, n, t, s in objects if k == "trigger"],
    }


def unordered_lists(catalog: Catalog) -> Catalog:
    """The catalog with the items of each literal list sorted: the code before
    the schema was frozen wrote `state IN (...)` in a set's iteration order,
    which differs between processes."""

    def sort_items(match: re.Match[str]) -> str:
        items = sorted(item.strip() for item in match.group(2).split(","))
        return f"{match.group(1)}{', '.join(items)}{match.group(3)}"

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return re.sub(r"(ARRAY\[|IN \()('[^\]\)]*)(\]|\))", sort_items, value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(walk(v) for v in value)
        return value

    return walk(catalog)  # type: ignore[no-any-return]
