"""Helpers shared by the tests that drive `Store` directly: the values of a
plain submit, polling until a condition holds, the reaper's answer, and a
connection of the test's own to the store's database (for fixture writes
and raw reads: tests never borrow the store's pools)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from fastapi_bgtasks.store import RunRow, Store, runs
from fastapi_bgtasks.wire import Report, ReportState
from tests import timing


def run_values(task: str, **options: Any) -> dict[str, Any]:
    """`Store.insert_run` keyword arguments: a due run with no retries, `options` on top."""
    values: dict[str, Any] = {
        "task": task,
        "args": [],
        "kwargs": {},
        "max_attempts": 1,
        "max_rescues": 3,
        "retry_delays": [0.0],
        "timeout_seconds": None,
        "priority": 0,
        "countdown": None,
        "eta": None,
        "idempotency_key": None,
    }
    values.update(options)
    return values


async def submit_run(store: Store, task: str, **options: Any) -> RunRow:
    """A new run's stored row (a repeated idempotency key fails the test)."""
    row, created = await store.insert_run(**run_values(task, **options))
    assert created
    return row


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = timing.DEADLINE) -> Any:
    """Poll `check` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await anyio.sleep(0.01)


@asynccontextmanager
async def own_engine(store: Store) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on the store's database, disposed after."""
    engine = create_async_engine(store.url, poolclass=NullPool)
    try:
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def connect(store: Store, *, begin: bool = False) -> AsyncIterator[AsyncConnection]:
    """One connection of the test's own; `begin`: in a transaction committed at the end."""
    async with own_engine(store) as engine, engine.begin() if begin else engine.connect() as conn:
        yield conn


async def write(store: Store, statement: Any) -> None:
    """A fixture write straight to the tables (a backdated lease...), committed."""
    async with connect(store, begin=True) as conn:
        await conn.execute(statement)


async def read(store: Store, statement: Any) -> list[Any]:
    """Rows read straight from the tables."""
    async with connect(store) as conn:
        return list(await conn.execute(statement))


async def stored_rows(store: Store) -> dict[uuid.UUID, dict[str, Any]]:
    """Every run as stored, by id."""
    return {row.id: dict(row._mapping) for row in await read(store, sa.select(runs))}


async def clock(store: Store) -> datetime:
    """The store's clock: the server's now() on PostgreSQL, the app's on SQLite."""
    if not store.is_pg:
        return datetime.now(UTC)
    async with connect(store) as conn:
        value = await conn.scalar(sa.select(sa.func.now()))
    assert isinstance(value, datetime)
    return value


def store_time(store: Store, seconds: float) -> Any:
    """`seconds` from now on the store's clock, as a value to write in a statement."""
    if store.is_pg:
        return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval)
    return sa.literal(datetime.now(UTC) + timedelta(seconds=seconds), sa.DateTime(timezone=True))


async def reap_expired(store: Store) -> list[tuple[uuid.UUID, str]]:
    """(run id, new state) of each run the reaper took back."""
    return [(run_id, state) for run_id, state, _ in await store.reap_expired_runs()]


def report(delivery: Mapping[str, Any], state: ReportState, **fields: Any) -> Report:
    """A worker's report on a claimed run, under the lease it was delivered with."""
    return Report(run_id=delivery["id"], lease_token=delivery["lease_token"], state=state, **fields)


async def apply(store: Store, *reports: Report, max_result_bytes: int = 1 << 20) -> list[str]:
    """Apply a batch; its outcomes only."""
    outcomes = await store.apply_reports(list(reports), max_result_bytes=max_result_bytes)
    return [outcome for outcome, _ in outcomes]


async def fetch(store: Store, run_id: uuid.UUID) -> dict[str, Any]:
    """A run as stored, as a plain dict (tests index any column, None or not)."""
    row = await store.get_run(run_id)
    assert row is not None
    return dict(row)
