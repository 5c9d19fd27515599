"""Store calls cancelled mid-statement, as a feed's claim is when its worker
goes away or a request's when the app shuts down: the store must come out
with no connection held and no lock on the database."""

from __future__ import annotations

import random
import time

import anyio
import pytest

from fastapi_bgtasks.errors import BgTasksError
from fastapi_bgtasks.store import Store
from tests.storekit import run_values

pytestmark = pytest.mark.anyio

ROUNDS = 60
CALLS = 20


def _checked_out(store: Store) -> int:
    db = store.db
    engines = {id(e): e for e in (db._writer, db._reader) if e is not None}
    return sum(int(e.pool.checkedout()) for e in engines.values())  # type: ignore[attr-defined]


async def test_calls_cancelled_mid_statement_leave_the_store_writable(store: Store) -> None:
    """Claims and submits cut short after a random few milliseconds, twenty
    at a time: after each round a write commits at once (the write probe
    waits at most 1 s for the lock) and no connection is left checked out.
    Before, on SQLite, a claim cut short could leave its connection open,
    holding the write lock, until garbage collection: every writer of the
    file waited out the 30 s busy timeout."""
    for _ in range(50):
        await store.insert_run(**run_values("t"))
    pick = random.Random(20261205)

    async def cut_short(i: int) -> None:
        with anyio.move_on_after(pick.uniform(0, 0.004)):
            try:
                if i % 2:
                    await store.claim(
                        worker_id=f"w{i % 7}", tasks=["t"], slots=3, lease_seconds=0.05
                    )
                else:
                    await store.insert_run(**run_values("t"))
            except BgTasksError:
                pass  # the failure under test shows as the write below timing out

    for _ in range(ROUNDS):
        started = time.monotonic()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for i in range(CALLS):
                    group.start_soon(cut_short, i)
        with anyio.fail_after(5):
            await store.probe_write(1.0)
        assert time.monotonic() - started < 5
        assert _checked_out(store) == 0
