"""PostgreSQL's hot statements on asyncpg directly: the submit's INSERT, one
round trip each, prepared once per connection. SQLAlchemy keeps the schema,
migrations, listings and SQLite; on this path it cost more than the
statement itself (a pool checkout, a greenlet hop per call, parameter and
result processing).

The connections are this module's own: at most the store's pool size at
once, kept idle and reused. They hold no session state (autocommit, no
temporary objects, no LISTEN), so a connection goes back without a reset;
one that failed is closed instead. (A store's submits take one at a time:
the group commit sends one statement while the next group gathers.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import StoreUnavailable
from ..states import RunState

if TYPE_CHECKING:
    import asyncpg

    from .dialect import Database

__all__ = ["FastPath"]

_COLUMNS = (
    "id, task, state, attempt, rescues, cancel_requested, max_attempts, max_rescues, "
    "retry_delays, timeout_seconds, priority, args, kwargs, idempotency_key, "
    "created_at, updated_at, scheduled_at"
)
_RETURNING = "RETURNING id, task, created_at, scheduled_at"

# One run: the scheduled time is the eta, else now() plus the countdown.
INSERT_ONE = f"""
INSERT INTO bgtasks_runs ({_COLUMNS})
VALUES ($1, $2, '{RunState.SCHEDULED.value}', 0, 0, false, $3, $4, $5::json, $6, $7,
    $8::json, $9::json, $10, now(), now(), coalesce($11, now() + $12::interval))
{_RETURNING}""".strip()

# Many runs in one statement (a group commit): arrays, one element per run.
INSERT_MANY = f"""
INSERT INTO bgtasks_runs ({_COLUMNS})
SELECT r.id, r.task, '{RunState.SCHEDULED.value}', 0, 0, false, r.max_attempts,
    r.max_rescues, r.retry_delays::json, r.timeout_seconds, r.priority, r.args::json,
    r.kwargs::json, r.idempotency_key, now(), now(),
    coalesce(r.eta, now() + r.delay)
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::float8[],
    $7::int[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::interval[])
    AS r(id, task, max_attempts, max_rescues, retry_delays, timeout_seconds, priority,
         args, kwargs, idempotency_key, eta, delay)
{_RETURNING}""".strip()

# INSERT_ONE and a NOTIFY of its task in one statement: one round trip,
# delivered when the insert commits (submitters with no lifespan).
INSERT_ONE_NOTIFY = f"""
WITH inserted AS ({INSERT_ONE})
SELECT inserted.*, pg_notify($13, inserted.task) FROM inserted""".strip()
_CONNECT_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 15.0  # a hung database answers 503, as on the SQLAlchemy path


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def insert_args(params: Any) -> tuple[Any, ...]:
    """INSERT_ONE's arguments from a submit's parameters (store/rows.Submitted)."""
    return (
        params["id"], params["task"], params["max_attempts"], params["max_rescues"],
        _dumps(params["retry_delays"]), params["timeout_seconds"], params["priority"],
        _dumps(params["args"]), _dumps(params["kwargs"]), params["idempotency_key"],
        params["eta"], params["delay"],
    )  # fmt: skip


def insert_many_args(batch: Sequence[Any]) -> tuple[list[Any], ...]:
    """INSERT_MANY's arrays: insert_args of each submit, column by column."""
    rows = [insert_args(params) for params in batch]
    return tuple(list(column) for column in zip(*rows, strict=True))


class FastPath:
    """asyncpg connections for the hot statements of one store."""

    def __init__(self, db: Database, size: int) -> None:
        self._db = db
        self._idle: list[asyncpg.Connection] = []
        self._slots = anyio.Semaphore(size)
        self._size = size
        self.opened = 0  # connections open now, idle or in use
        self._dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await conn.close(timeout=2)
            self.opened -= 1

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """An idle connection or a new one, shielded from cancellation as
        the SQLAlchemy path is (dialect._uncancelled); errors translated."""
        with anyio.CancelScope(shield=True):
            async with self._slots, self._checked_out() as conn:
                yield conn

    @asynccontextmanager
    async def _checked_out(self) -> AsyncIterator[asyncpg.Connection]:
        import asyncpg

        conn = None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            yield conn
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            OSError,
            TimeoutError,
            UnicodeEncodeError,
        ) as exc:
            broken, conn = conn, None
            if broken is not None:
                self._drop(broken)
            translated = self._db.translate(exc, direct=True)
            if isinstance(translated, StoreUnavailable):
                # The database went away (a restart, a failover): the idle
                # connections are as dead as this one.
                stale, self._idle = self._idle, []
                for idle in stale:
                    self._drop(idle)
            raise translated from exc
        finally:
            if conn is not None:
                if len(self._idle) < self._size and not conn.is_closed():
                    self._idle.append(conn)
                else:
                    self._drop(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        self.opened -= 1
        conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        import asyncpg

        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=_CONNECT_TIMEOUT,
            command_timeout=_COMMAND_TIMEOUT,
            server_settings={"application_name": "fastapi_bgtasks"},
        )
        self.opened += 1
        return conn

    async def insert_one(self, params: Any, *, notify: str | None) -> Any:
        """One run; `notify`: the channel to NOTIFY in the same transaction."""
        async with self.connection() as conn:
            if notify is None:
                return await conn.fetchrow(INSERT_ONE, *insert_args(params))
            return await conn.fetchrow(INSERT_ONE_NOTIFY, *insert_args(params), notify)

    async def insert_many(self, batch: Sequence[Any]) -> list[Any]:
        """Several runs in one statement, all or none."""
        async with self.connection() as conn:
            return list(await conn.fetch(INSERT_MANY, *insert_many_args(batch)))
