"""CPU per run of the store's hot path, in one process: 2,000 submits from 50
coroutines (group commit), then claims of 20 and COMPLETED reports in
batches of 20 until the queue is empty. Timed by the process's own CPU
clock (the driver threads included, the database server not), which is
steadier than wall time on shared cores.

    python -m benchmarks.store_cpu sqlite
    python -m benchmarks.store_cpu postgres

It uses only the `Store` API, so a copy of this file runs against an older
tree too (docs/benchmarks.md compares the re-layout with the code before it).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from typing import Any

import anyio
import asyncpg

from fastapi_bgtasks.store import Store

try:
    from fastapi_bgtasks.wire import Report
except ImportError:  # the tree before the re-layout
    from fastapi_bgtasks.models import Report  # type: ignore[import-not-found,no-redef]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
RUNS = 2000
SUBMITTERS = 50
BATCH = 20
OPTIONS: dict[str, Any] = {
    "max_attempts": 1,
    "max_rescues": 3,
    "retry_delays": [0.0],
    "timeout_seconds": None,
    "priority": 0,
    "countdown": None,
    "eta": None,
    "idempotency_key": None,
}


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _measure(store: Store) -> dict[str, float]:
    async def submitter(n: int) -> None:
        for i in range(n):
            await store.insert_run(task="noop", args=[i], kwargs={}, **OPTIONS)

    started = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(SUBMITTERS):
            tg.start_soon(submitter, RUNS // SUBMITTERS)
    submitted = time.process_time()
    drained = 0
    while rows := await store.claim(
        worker_id="bench:1:x", tasks=["noop"], slots=BATCH, lease_seconds=30
    ):
        reports = [
            Report(run_id=r["id"], lease_token=r["lease_token"], state="COMPLETED", result=i)
            for i, r in enumerate(rows)
        ]
        await store.apply_reports(reports, max_result_bytes=1 << 20)
        drained += len(rows)
    finished = time.process_time()
    return {
        "submit_cpu_ms_per_run": (submitted - started) / RUNS * 1000,
        "drain_cpu_ms_per_run": (finished - submitted) / max(drained, 1) * 1000,
    }


async def main(backend: str) -> None:
    name = None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db"
    else:
        name = f"bench_{uuid.uuid4().hex[:12]}"
        await _admin(f'CREATE DATABASE "{name}"')
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    store = Store(url)
    try:
        await store.open()
        await store.migrate()
        figures = await _measure(store)
    finally:
        await store.close()
        if name:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps({"backend": backend, **figures}))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "sqlite")
