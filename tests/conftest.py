"""Fixtures shared by every tier: the two storage backends, hubs with short
timing knobs, and real app and worker processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.store import Store
from tests import timing
from tests.harness.procs import Proc, start_app, start_worker

PG_ADMIN = os.environ.get("BGTASKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = [b for b in os.environ.get("BGTASKS_TEST_BACKENDS", "sqlite,postgres").split(",") if b]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


def _fresh_database(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory}/bgtasks.db"
        return
    name = f"bgt_{uuid.uuid4().hex[:16]}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(name)
    finally:
        anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    yield from _fresh_database(request.param, tmp_path)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """One database per backend for a whole module of tests that do not
    disturb each other (each works on its own runs)."""
    directory = tmp_path_factory.mktemp(f"shared-{request.param}")
    for url in _fresh_database(request.param, directory):
        yield url, directory


@pytest.fixture(scope="module")
def shared_server(shared_db: tuple[str, Path]) -> Iterator[str]:
    """An app and one worker (concurrency 4) shared by a module; yields the base URL."""
    url, directory = shared_db
    proc, base = start_app(url, directory)
    worker = start_worker(f"{base}/tasks", url, directory)
    try:
        yield base
    finally:
        worker.stop()
        proc.stop()


def short_hub(db_url: str, **options: object) -> BgTasks:
    knobs: dict[str, object] = {
        "lease_seconds": timing.LEASE_SECONDS,
        "heartbeat_seconds": timing.HEARTBEAT_SECONDS,
        "reaper_seconds": timing.REAPER_SECONDS,
        "poll_seconds": timing.POLL_SECONDS,
    }
    knobs.update(options)
    return BgTasks(db_url, **knobs)  # type: ignore[arg-type]


@pytest.fixture
async def migrated(db_url: str) -> AsyncIterator[str]:
    """A database whose schema exists (created by a lifespan, then closed)."""
    hub = BgTasks(db_url)
    async with hub.lifespan():
        pass
    yield db_url


@pytest.fixture
def app_server(db_url: str, tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, base = start_app(db_url, tmp_path)
    try:
        yield proc, base
    finally:
        proc.stop()


@pytest.fixture
def workers(db_url: str, tmp_path: Path) -> Iterator[list[Proc]]:
    """Started by the test (it knows the URL); stopped here."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


__all__ = ["short_hub", "start_app", "start_worker"]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """An open store on a fresh database whose schema exists."""
    opened = Store(db_url)
    await opened.open()
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()
