"""RAW: what the databases do without the library, measured by the same
harness on the same machine, into the library's own runs table (its indexes
and history trigger included), so the gap is what the library adds.

PostgreSQL (asyncpg, prepared statements, no pool): single-row INSERT in
autocommit; the same in batches of 100 (executemany in one transaction);
claims one by one (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1, then UPDATE,
one transaction each).
SQLite (the stdlib sqlite3): single-row INSERT + commit with SQLite's default
journal (rollback journal, synchronous=FULL) and with WAL +
synchronous=NORMAL (the library's settings); batches of 100 and one-by-one
claims (UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING) with WAL.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from benchmarks.harness import Bench, Context, create_schema

BATCH = 100
_COLUMNS = """(id, task, state, attempt, max_attempts, rescues, max_rescues, retry_delays,
    priority, args, kwargs, created_at, scheduled_at, updated_at, cancel_requested)"""

_PG_INSERT = f"""INSERT INTO bgtasks_runs {_COLUMNS}
VALUES ($1, 'noop', 'SCHEDULED', 0, 1, 0, 3, '[0.0]', 0, '[]', '{{}}',
    now(), now(), now(), false)"""
_PG_DUE = """SELECT id FROM bgtasks_runs
WHERE state = 'SCHEDULED' AND task = 'noop' AND scheduled_at <= now()
ORDER BY priority DESC, scheduled_at LIMIT 1 FOR UPDATE SKIP LOCKED"""
_PG_LEASE = """UPDATE bgtasks_runs
SET state = 'PENDING', attempt = attempt + 1, worker_id = $2, lease_token = $3,
    lease_expires_at = now() + interval '30 seconds', updated_at = now()
WHERE id = $1"""

_SQLITE_INSERT = f"""INSERT INTO bgtasks_runs {_COLUMNS}
VALUES (?, 'noop', 'SCHEDULED', 0, 1, 0, 3, '[0.0]', 0, '[]', '{{}}', ?, ?, ?, 0)"""
_SQLITE_CLAIM = """UPDATE bgtasks_runs
SET state = 'PENDING', attempt = attempt + 1, worker_id = ?, lease_token = ?,
    lease_expires_at = ?, updated_at = ?
WHERE id = (
    SELECT id FROM bgtasks_runs
    WHERE state = 'SCHEDULED' AND task = 'noop' AND scheduled_at <= ?
    ORDER BY priority DESC, scheduled_at LIMIT 1)
RETURNING id"""


# -- PostgreSQL ------------------------------------------------------------------


async def _pg_single(conn: Any, rows: int) -> float:
    started = time.perf_counter()
    for _ in range(rows):
        await conn.execute(_PG_INSERT, uuid.uuid4())
    return rows / (time.perf_counter() - started)


async def _pg_batches(conn: Any, rows: int) -> float:
    batches = max(1, rows // BATCH)
    started = time.perf_counter()
    for _ in range(batches):
        async with conn.transaction():
            await conn.executemany(_PG_INSERT, [(uuid.uuid4(),) for _ in range(BATCH)])
    return batches * BATCH / (time.perf_counter() - started)


async def _pg_claims(conn: Any, claims: int) -> float:
    worker_id = "raw"
    started = time.perf_counter()
    for _ in range(claims):
        async with conn.transaction():
            run_id = await conn.fetchval(_PG_DUE)
            if run_id is None:
                raise RuntimeError("nothing left to claim")
            await conn.execute(_PG_LEASE, run_id, worker_id, uuid.uuid4().hex)
    return claims / (time.perf_counter() - started)


async def postgres(dsn: str, rows: int) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await _pg_single(conn, min(rows, 20))  # warm-up: prepare, cache
        return {
            "rows": rows,
            "insert_per_s": await _pg_single(conn, rows),
            "batch100_rows_per_s": await _pg_batches(conn, rows),
            "claims_per_s": await _pg_claims(conn, rows),
        }
    finally:
        await conn.close()


# -- SQLite ------------------------------------------------------------------------


def _sqlite_now(offset: float = 0.0) -> str:
    """A time as SQLAlchemy stores it in SQLite (text, compared as text)."""
    return (datetime.now(UTC) + timedelta(seconds=offset)).strftime("%Y-%m-%d %H:%M:%S.%f")


def _row() -> tuple[str, str, str, str]:
    now = _sqlite_now()
    return uuid.uuid4().hex, now, now, now


def _sqlite_open(path: Path, *, wal: bool) -> sqlite3.Connection:
    """The library's schema in a new file, opened with either journal mode."""
    anyio.run(create_schema, f"sqlite+aiosqlite:///{path}")
    conn = sqlite3.connect(path, timeout=30)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    else:  # the library left the file in WAL: back to SQLite's defaults
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
    return conn


def _sqlite_single(conn: sqlite3.Connection, rows: int) -> float:
    started = time.perf_counter()
    for _ in range(rows):
        conn.execute(_SQLITE_INSERT, _row())
        conn.commit()
    return rows / (time.perf_counter() - started)


def _sqlite_batches(conn: sqlite3.Connection, rows: int) -> float:
    batches = max(1, rows // BATCH)
    started = time.perf_counter()
    for _ in range(batches):
        conn.executemany(_SQLITE_INSERT, [_row() for _ in range(BATCH)])
        conn.commit()
    return batches * BATCH / (time.perf_counter() - started)


def _sqlite_claims(conn: sqlite3.Connection, claims: int) -> float:
    started = time.perf_counter()
    for _ in range(claims):
        now = _sqlite_now()
        lease = ("raw", uuid.uuid4().hex, _sqlite_now(30), now, now)
        if conn.execute(_SQLITE_CLAIM, lease).fetchone() is None:
            raise RuntimeError("nothing left to claim")
        conn.commit()
    return claims / (time.perf_counter() - started)


def sqlite(directory: Path, rows: int) -> dict[str, Any]:
    default = _sqlite_open(directory / "raw-default.db", wal=False)
    try:
        insert_default = _sqlite_single(default, rows)
    finally:
        default.close()
    wal = _sqlite_open(directory / "raw-wal.db", wal=True)
    try:
        return {
            "rows": rows,
            "insert_default_journal_per_s": insert_default,
            "insert_per_s": _sqlite_single(wal, rows),
            "batch100_rows_per_s": _sqlite_batches(wal, rows),
            "claims_per_s": _sqlite_claims(wal, rows),
        }
    finally:
        wal.close()


async def _pg_floor(dsn: str, rows: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await _pg_single(conn, min(rows, 20))  # warm-up: prepare, cache
        return await _pg_single(conn, rows)
    finally:
        await conn.close()


def floor(backend: str, ctx: Context) -> dict[str, Any]:
    """The single-row INSERT+commit loop alone, W1's size (`--runs`): the
    floor W1's submits are quoted against (its inserts/s as `submit_per_s`)."""
    rows = ctx.sizes.runs
    with Bench(backend) as bench:
        if backend == "sqlite":
            conn = _sqlite_open(bench.directory / "raw-wal.db", wal=True)
            try:
                _sqlite_single(conn, min(rows, 20))
                return {"rows": rows, "submit_per_s": _sqlite_single(conn, rows)}
            finally:
                conn.close()
        anyio.run(create_schema, bench.db.url)
        return {"rows": rows, "submit_per_s": anyio.run(_pg_floor, bench.db.dsn, rows)}


def raw(backend: str, ctx: Context) -> dict[str, Any]:
    """The raw driver loops for this backend, in a scratch database."""
    rows = ctx.sizes.raw_rows
    with Bench(backend) as bench:
        if backend == "sqlite":
            return sqlite(bench.directory, rows)
        anyio.run(create_schema, bench.db.url)
        return anyio.run(postgres, bench.db.dsn, rows)
