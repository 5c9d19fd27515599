"""Bringing a database's schema to this package's version, and checking it
in processes that must not change it. The statements themselves are the
frozen DDL of ddl.py; this module runs them in order, under a lock.
"""

from __future__ import annotations

import logging

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..backoff import Backoff
from ..errors import SchemaError
from .ddl import MIGRATIONS, SCHEMA_TABLE
from .dialect import Database
from .schema import schema_table

__all__ = ["SCHEMA_VERSION", "check_schema", "migrate"]

log = logging.getLogger("fastapi_bgtasks.store")

SCHEMA_VERSION = len(MIGRATIONS)
LOCK_KEY = 0x6267_7461_736B  # "bgtask": the advisory lock migrations hold
_MIGRATION_WAIT = 300.0  # seconds another process's migration may take


async def migrate(db: Database, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to `target` (this package's version) under a lock;
    returns the version. Two app processes may start at once: PostgreSQL
    serialises them on an advisory lock, SQLite on BEGIN IMMEDIATE."""
    async with db.write() as conn:
        if db.is_pg:
            await _migration_lock(conn)
        current = await schema_version(conn)
        if current is None:
            await conn.exec_driver_sql(SCHEMA_TABLE)
            await conn.execute(schema_table.insert().values(version=0))
            current = 0
        if current > SCHEMA_VERSION:
            raise SchemaError(
                f"The database {db.display_url} has schema version {current}, newer "
                f"than this fastapi_bgtasks knows ({SCHEMA_VERSION}). Upgrade the package."
            )
        for number in range(current + 1, target + 1):
            log.info("Applying fastapi_bgtasks migration %d", number)
            for statement in MIGRATIONS[number - 1][db.dialect]:
                await conn.exec_driver_sql(statement)
            await conn.execute(schema_table.update().values(version=number))
        return max(current, target)


async def _migration_lock(conn: AsyncConnection) -> None:
    """Wait for another process's migration: polled with try-lock, so no
    single statement outlives the command timeout."""
    backoff = Backoff(0.05, 1.0)
    with anyio.fail_after(_MIGRATION_WAIT):
        while not await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(LOCK_KEY))):
            await backoff.sleep()


async def check_schema(db: Database) -> None:
    """For processes that must not create it: fail clearly when it is missing."""
    if not db.is_pg and not await anyio.Path(db.url.database or "").exists():
        # Connecting would create an empty file; say what is missing instead.
        raise SchemaError(
            f"No fastapi_bgtasks schema in {db.display_url} (no such file). Start the "
            "app once (its lifespan creates it: FastAPI(lifespan=bg.lifespan)), or check "
            "the URL."
        )
    async with db.read() as conn:
        current = await schema_version(conn)
    if current is None or current == 0:
        raise SchemaError(
            f"No fastapi_bgtasks schema in {db.display_url}. Start the app once "
            "(its lifespan creates it: FastAPI(lifespan=bg.lifespan)), or check the URL."
        )
    if current != SCHEMA_VERSION:
        raise SchemaError(
            f"The database {db.display_url} has schema version {current}; this "
            f"fastapi_bgtasks needs {SCHEMA_VERSION}. Upgrade the app or the package."
        )


async def schema_version(conn: AsyncConnection) -> int | None:
    """The version recorded in the database; None when it has no schema table."""
    has_table = await conn.run_sync(lambda c: sa.inspect(c).has_table(schema_table.name))
    if not has_table:
        return None
    version = await conn.scalar(sa.select(sa.func.max(schema_table.c.version)))
    return int(version or 0)
