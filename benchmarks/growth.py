"""W7: what a submit and a claim cost as the runs table grows.

The table is filled in SQL (fast) with runs shaped like a long-lived app's:
half finished (COMPLETED of the measured task), half queued (SCHEDULED of a
task nobody claims, so they stay queued). Each inserted run also writes its
history row through the library's trigger, as a real submit does. Then, in
this process and through the library's own Store:

- submit: sequential `store.insert_run(...)`, each timed;
- claim: sequential `store.claim(...)` of those runs by one worker with one
  slot, each claimed run completed (untimed) before the next claim.

The table grows in place from one size to the next. PostgreSQL is ANALYZEd
after each fill (autovacuum would do so on a real table); SQLite is left as
an app leaves it (no ANALYZE).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from benchmarks.harness import Bench, Context, Database, MiB, percentile

if TYPE_CHECKING:
    from fastapi_bgtasks.store import Store

# The task whose runs are measured, and the one whose queued runs are never claimed.
MEASURED, IDLE = "noop", "idle"
WARMUP = 10  # untimed calls first: connections, prepared statements, caches
PG_CHUNK = 100_000  # rows per INSERT ... SELECT: bounds the trigger queue's memory

_PG_FILL = """
INSERT INTO bgtasks_runs (
    id, task, state, attempt, max_attempts, rescues, max_rescues, retry_delays,
    priority, args, kwargs, created_at, scheduled_at, started_at, finished_at,
    updated_at, worker_id, cancel_requested)
SELECT gen_random_uuid(),
       CASE WHEN done THEN 'noop' ELSE 'idle' END,
       CASE WHEN done THEN 'COMPLETED' ELSE 'SCHEDULED' END,
       CASE WHEN done THEN 1 ELSE 0 END, 1, 0, 3, '[0.0]', 0, '[]', '{}',
       at, at,
       CASE WHEN done THEN at END,
       CASE WHEN done THEN at + interval '5 milliseconds' END,
       CASE WHEN done THEN at + interval '5 milliseconds' ELSE at END,
       CASE WHEN done THEN 'prefill' END,
       false
FROM (
    SELECT g % 2 = 0 AS done, now() - ($2 - g) * interval '1 second' AS at
    FROM generate_series($1::bigint, $2::bigint - 1) AS g
) AS s
"""

# SQLite stores times as SQLAlchemy writes them: 'YYYY-MM-DD HH:MM:SS.ffffff'.
_SQLITE_FILL = """
WITH RECURSIVE g(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM g WHERE i < ? - 1),
s(done, at, fin) AS (
    SELECT i % 2 = 0,
           strftime('%Y-%m-%d %H:%M:%f', 'now', printf('-%d seconds', ? - i)) || '000',
           strftime('%Y-%m-%d %H:%M:%f', 'now', printf('-%d seconds', ? - i), '+0.005 seconds')
               || '000'
    FROM g
)
INSERT INTO bgtasks_runs (
    id, task, state, attempt, max_attempts, rescues, max_rescues, retry_delays,
    priority, args, kwargs, created_at, scheduled_at, started_at, finished_at,
    updated_at, worker_id, cancel_requested)
SELECT lower(hex(randomblob(16))),
       CASE WHEN done THEN 'noop' ELSE 'idle' END,
       CASE WHEN done THEN 'COMPLETED' ELSE 'SCHEDULED' END,
       CASE WHEN done THEN 1 ELSE 0 END, 1, 0, 3, '[0.0]', 0, '[]', '{}',
       at, at,
       CASE WHEN done THEN at END,
       CASE WHEN done THEN fin END,
       CASE WHEN done THEN fin ELSE at END,
       CASE WHEN done THEN 'prefill' END,
       0
FROM s
"""


async def _fill_pg(dsn: str, start: int, stop: int) -> None:
    """Rows numbered [start, stop) in chunks, then ANALYZE."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for low in range(start, stop, PG_CHUNK):
            await conn.execute(_PG_FILL, low, min(low + PG_CHUNK, stop))
        await conn.execute("ANALYZE bgtasks_runs; ANALYZE bgtasks_run_history")
    finally:
        await conn.close()


def _fill_sqlite(path: Path, start: int, stop: int) -> None:
    """Rows numbered [start, stop) in one transaction."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            conn.execute(_SQLITE_FILL, (start, stop, stop, stop))
    finally:
        conn.close()


async def _fill(db: Database, start: int, stop: int) -> None:
    if stop <= start:
        return
    if db.path is not None:
        await anyio.to_thread.run_sync(_fill_sqlite, db.path, start, stop)
    else:
        await _fill_pg(db.dsn, start, stop)


async def _timed_submits(store: Store, count: int) -> list[float]:
    """Seconds per `insert_run` of the measured task, after the warm-up."""
    timings = []
    for i in range(WARMUP + count):
        started = time.perf_counter()
        await store.insert_run(
            task=MEASURED,
            args=[],
            kwargs={},
            max_attempts=1,
            max_rescues=3,
            retry_delays=[0.0],
            timeout_seconds=None,
            priority=0,
            countdown=None,
            eta=None,
            idempotency_key=None,
        )
        if i >= WARMUP:
            timings.append(time.perf_counter() - started)
    return timings


async def _timed_claims(store: Store, count: int) -> list[float]:
    """Seconds per one-run claim by one worker. Each claimed run is then
    completed (untimed), as its worker would: the slot is free for the next
    claim and no lease lingers to inflate the next claim's count of held runs."""
    from fastapi_bgtasks.wire import Report

    worker_id = f"w7-{uuid.uuid4().hex[:12]}"
    timings = []
    for i in range(WARMUP + count):
        started = time.perf_counter()
        claimed = await store.claim(
            worker_id=worker_id, tasks=[MEASURED], slots=1, lease_seconds=30
        )
        elapsed = time.perf_counter() - started
        if len(claimed) != 1:
            raise RuntimeError(f"a claim took {len(claimed)} runs, expected 1")
        done = Report(
            run_id=claimed[0]["id"], lease_token=claimed[0]["lease_token"], state="COMPLETED"
        )
        [(outcome, _)] = await store.apply_reports([done], max_result_bytes=MiB)
        if outcome != "accepted":
            raise RuntimeError(f"completing a claimed run was {outcome}")
        if i >= WARMUP:
            timings.append(elapsed)
    return timings


def label(size: int) -> str:
    """1000 → 1k, 1000000 → 1M: column names."""
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1_000 and size % 1_000 == 0:
        return f"{size // 1_000}k"
    return str(size)


async def _grow(db: Database, sizes: tuple[int, ...], samples: int) -> dict[str, Any]:
    from fastapi_bgtasks.store import Store

    store = Store(db.url)
    await store.open()
    figures: dict[str, Any] = {}
    try:
        await store.migrate()
        filled = 0
        for size in sorted(sizes):
            started = time.perf_counter()
            await _fill(db, filled, size)
            filled = size
            tag = label(size)
            figures[f"fill_s_{tag}"] = time.perf_counter() - started
            submits = await _timed_submits(store, samples)
            claims = await _timed_claims(store, samples)
            figures[f"submit_p50_ms_{tag}"] = percentile(submits, 50) * 1000
            figures[f"claim_p50_ms_{tag}"] = percentile(claims, 50) * 1000
    finally:
        await store.close()
    low, high = label(min(sizes)), label(max(sizes))
    figures["submit_ratio"] = figures[f"submit_p50_ms_{high}"] / figures[f"submit_p50_ms_{low}"]
    figures["claim_ratio"] = figures[f"claim_p50_ms_{high}"] / figures[f"claim_p50_ms_{low}"]
    return figures


def w7(backend: str, ctx: Context) -> dict[str, Any]:
    """Submit and claim p50 with each of the table sizes already stored,
    and the ratio of the largest size's p50 to the smallest's."""
    with Bench(backend) as bench:
        return anyio.run(_grow, bench.db, ctx.sizes.table_sizes, ctx.sizes.table_samples)
