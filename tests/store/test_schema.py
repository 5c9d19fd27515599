"""The schema's history is frozen DDL: a database brought forward from any
version looks exactly like one made at the latest, and the Table objects
the store builds its queries from match what the migrations made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.engine.interfaces import Dialect

from fastapi_bgtasks.store import SCHEMA_VERSION, Store, history, runs, schema_table
from fastapi_bgtasks.store.migrations import migrate
from tests.store.catalog import catalog
from tests.storekit import connect

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = Store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("start", range(SCHEMA_VERSION + 1))
async def test_a_database_migrated_forward_from_each_version_matches_a_fresh_one(
    db_url: str, other_db_url: str, start: int
) -> None:
    async with opened(db_url) as fresh:
        assert await fresh.migrate() == SCHEMA_VERSION
    async with opened(other_db_url) as old:
        assert await migrate(old.db, target=start) == start
        async with connect(old) as conn:
            assert await conn.scalar(sa.select(schema_table.c.version)) == start
        assert await old.migrate() == SCHEMA_VERSION
    head = await catalog(db_url)
    assert "bgtasks_runs_due" in str(head["indexes"]) and head["triggers"]
    assert await catalog(other_db_url) == head


def _spelled(type_: sa.types.TypeEngine[object], dialect: Dialect) -> str:
    """A column type as the database spells it (PostgreSQL's FLOAT is double precision)."""
    spelled = type_.compile(dialect=dialect)
    return {"FLOAT": "DOUBLE PRECISION"}.get(spelled, spelled)


@pytest.mark.parametrize("table", [runs, history, schema_table], ids=lambda t: t.name)
async def test_the_tables_queries_are_built_from_match_the_migrated_schema(
    store: Store, table: sa.Table
) -> None:
    async with connect(store) as conn:
        reflected = await conn.run_sync(lambda c: sa.inspect(c).get_columns(table.name))
        dialect = conn.dialect
    stored = {c["name"]: (_spelled(c["type"], dialect), c["nullable"]) for c in reflected}
    declared = {c.name: (_spelled(c.type, dialect), c.nullable) for c in table.columns}
    assert [c["name"] for c in reflected] == [c.name for c in table.columns]
    assert stored == declared
