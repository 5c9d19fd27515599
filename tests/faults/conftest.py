"""Fixtures of the fault-injection suite: a private PostgreSQL cluster the
tests may restart and freeze, TCP proxies for link faults.

Every test here is marked `slow` (run in CI, skipped by `-m "not slow"`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.faults.pgcluster import PgCluster
from tests.faults.proxy import TcpProxy
from tests.harness.procs import free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PgCluster]:
    """A PostgreSQL 15 cluster of our own on a loopback port, run as `postgres`."""
    cluster = PgCluster(free_port())
    cluster.init()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def private_db(private_pg: PgCluster) -> Iterator[str]:
    """A fresh database on the private cluster; yields its SQLAlchemy URL."""
    import uuid

    name = f"bgt_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(private_pg.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    private_pg.wait_ready()
    anyio.run(admin, f'CREATE DATABASE "{name}"')
    try:
        yield private_pg.url(name)
    finally:
        private_pg.resume()
        private_pg.wait_ready()
        anyio.run(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def proxies() -> Iterator[list[TcpProxy]]:
    """Append proxies to this list; they are closed after the test."""
    made: list[TcpProxy] = []
    yield made
    for proxy in made:
        proxy.close()
