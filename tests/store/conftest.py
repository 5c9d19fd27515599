"""Fixtures of the store's tests beyond the shared ones: a second fresh
database on the same backend as `db_url`, for comparing two schemas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import PG_ADMIN


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def other_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """Another fresh, empty database on `db_url`'s backend."""
    if not db_url.startswith("postgresql"):
        yield f"sqlite+aiosqlite:///{tmp_path}/other.db"
        return
    name = f"bgt_{uuid.uuid4().hex[:16]}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    try:
        yield f"{db_url.rsplit('/', 1)[0]}/{name}"
    finally:
        anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
