"""The database connection and every way SQLite and PostgreSQL differ in
handling it: drivers and pools, pragmas, transactions, the clock, and what
a driver's error means to the caller. Every other store module asks this
one for a connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..errors import ConfigurationError, InvalidValue, StoreUnavailable
from .clock import LeaseClock

__all__ = ["Database", "safe_url"]

# SQLAlchemy's and the drivers' ways of saying the database is not there.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    OSError,
)
_CAUGHT: tuple[type[BaseException], ...] = (*_UNAVAILABLE, sa.exc.DBAPIError, UnicodeEncodeError)

# SQLSTATEs worth a retry: a database going away, starting up or out of
# room (08, 53300, 57P0x), and transactions aborted by a serialization
# failure or a deadlock (40001, 40P01).
_BUSY_TIMEOUT_MS = 30_000  # how long a SQLite statement waits for the write lock

_UNAVAILABLE_STATES = ("08", "53300", "57P01", "57P02", "57P03", "40001", "40P01")


def safe_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver's error, wrapped by SQLAlchemy or not."""
    for error in (getattr(exc, "orig", None), exc):
        state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _is_unavailable(exc: BaseException) -> bool:
    """A lost, refused, restarting or hung database (a 503); any other
    database error is a bug and propagates as it is."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    state = _sqlstate(exc)
    return bool(exc.connection_invalidated) or (
        state is not None and state.startswith(_UNAVAILABLE_STATES)
    )


def _is_bad_value(exc: BaseException) -> bool:
    """SQLSTATE class 22, "data exception", or text no driver can encode:
    the request's fault, a 422."""
    if isinstance(exc, UnicodeEncodeError) or isinstance(
        getattr(exc, "orig", None), UnicodeEncodeError
    ):
        return True
    state = _sqlstate(exc)
    return state is not None and state.startswith("22")


def _parse(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"Not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"fastapi_bgtasks stores runs in SQLite or PostgreSQL, not {backend!r} "
            f"({safe_url(url)})."
        )
    driver = "sqlite+aiosqlite" if backend == "sqlite" else "postgresql+asyncpg"
    if parsed.drivername != driver:
        parsed = parsed.set(drivername=driver)
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "fastapi_bgtasks needs a SQLite file (workers and the app share it), "
            "not an in-memory database."
        )
    return parsed


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class Database:
    """One SQLAlchemy async engine on PostgreSQL; on SQLite two, one writer
    connection (SQLite has one writer anyway) and a few readers."""

    def __init__(
        self, url: str, *, pool_size: int = 10, wall: Callable[[], float] = time.time
    ) -> None:
        self.url = _parse(url)
        # The app's wall clock (`time.time`; a stepped one in tests).
        self.wall = wall
        # Leases are judged by this one, on both databases (clock.py).
        self.lease_clock = LeaseClock(wall)
        self.display_url = safe_url(url)
        self.dialect = self.url.get_backend_name()
        self.is_pg = self.dialect == "postgresql"
        self._pool_size = pool_size
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    def open(self) -> None:
        """Create the engines. Connects lazily: opening cannot fail on a down database."""
        if self._writer is not None:
            return
        if self.is_pg:
            self._writer = self._reader = create_async_engine(
                self.url,
                pool_size=self._pool_size,
                max_overflow=self._pool_size,
                pool_timeout=10,
                pool_recycle=1800,
                json_serializer=_dumps,
                connect_args={
                    "server_settings": {"application_name": "fastapi_bgtasks"},
                    "timeout": 10,
                    # A hung database answers 503 instead of holding requests forever.
                    "command_timeout": 15,
                },
            )
            return
        # BEGIN IMMEDIATE on the writer: writers queue instead of failing on upgrade.
        self._writer = self._sqlite_engine(pool_size=1, max_overflow=0, immediate=True)
        self._reader = self._sqlite_engine(pool_size=4, max_overflow=4, immediate=False)

    def _sqlite_engine(self, *, pool_size: int, max_overflow: int, immediate: bool) -> AsyncEngine:
        engine = create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=30,
            json_serializer=_dumps,
            connect_args={"timeout": 30},
        )
        _sqlite_pragmas(engine, immediate=immediate)
        return engine

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            await writer.dispose()
        if reader is not None and reader is not writer:
            await reader.dispose()

    def _engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        if self._writer is None or self._reader is None:
            raise StoreUnavailable("The store is not open.")
        return self._writer, self._reader

    def translate(self, exc: BaseException, *, direct: bool = False) -> BaseException:
        """A database error as what it means to the caller: the request's
        fault (422), a database to retry later (503), or a bug (as it is).
        `direct`: raised by asyncpg itself, not through SQLAlchemy
        (store/fastpath.py): a ValueError is a value asyncpg cannot encode
        (asyncpg.DataError), and an error without a SQLSTATE is a lost
        connection."""
        if _is_bad_value(exc) or (direct and isinstance(exc, ValueError)):
            return InvalidValue(
                "A value in this request cannot be stored (a NUL character or a value "
                "out of range)."
            )
        state = _sqlstate(exc)
        lost = direct and (state is None or state.startswith(_UNAVAILABLE_STATES))
        if not (lost or _is_unavailable(exc)):
            return exc
        return StoreUnavailable(
            f"The task store ({self.display_url}) is unavailable: {type(exc).__name__}"
        )

    @asynccontextmanager
    async def _translated(
        self, engine: AsyncEngine, *, begin: bool, autocommit: bool
    ) -> AsyncIterator[AsyncConnection]:
        """A connection whose database errors come out translated, and whose
        statements a cancellation cannot cut short (see `_uncancelled`)."""
        try:
            with _uncancelled():
                async with engine.connect() as conn:
                    if autocommit:
                        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    if begin:
                        async with conn.begin():
                            yield conn
                    else:
                        yield conn
        except _CAUGHT as exc:
            translated = self.translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    def write(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A transaction on the writer: BEGIN IMMEDIATE on SQLite."""
        return self._translated(self._engines()[0], begin=True, autocommit=False)

    def one(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """For a single write statement: autocommit, so no BEGIN/COMMIT round
        trips (on SQLite it still takes the write lock)."""
        return self._translated(self._engines()[0], begin=False, autocommit=True)

    def read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """For reads. On PostgreSQL in autocommit: each statement has its own
        snapshot anyway (READ COMMITTED), and a BEGIN and a ROLLBACK would
        triple the round trips of a one-statement read."""
        return self._translated(self._engines()[1], begin=False, autocommit=self.is_pg)

    async def probe_write(self, timeout: float) -> None:
        """Commit a write that changes nothing, waiting at most `timeout`
        seconds for the write lock: proof the store can take writes now (not
        held by another connection, not read-only, room to commit). Raises
        StoreUnavailable when it cannot."""
        try:
            if self.is_pg:
                await self._probe_pg(timeout)
            else:
                await self._probe_sqlite(timeout)
        except _CAUGHT as exc:
            raise StoreUnavailable(
                f"The task store ({self.display_url}) cannot take writes: {type(exc).__name__}"
            ) from exc

    async def _probe_pg(self, timeout: float) -> None:
        # Not shielded: health answers within its bound on a hung server, and
        # a cancelled asyncpg connection closes; the server rolls it back.
        async with self._engines()[0].begin() as conn:
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(timeout * 1000)}")
            # Takes the lock every write to the runs table takes (a LOCK TABLE
            # held elsewhere blocks it), and commits a row version.
            await conn.exec_driver_sql("UPDATE bgtasks_runs SET state = state WHERE false")
            await conn.exec_driver_sql("UPDATE bgtasks_schema SET version = version")

    async def _probe_sqlite(self, timeout: float) -> None:
        # A reader connection, so the probe never queues behind the app's own
        # writer; BEGIN IMMEDIATE, because a deferred BEGIN would not see a
        # write lock held by another connection until it wrote. Shielded once
        # checked out: `timeout` bounds its statements.
        async with self._engines()[1].connect() as conn:
            with _uncancelled():
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                try:
                    await conn.exec_driver_sql("BEGIN IMMEDIATE")
                    try:
                        await conn.exec_driver_sql("UPDATE bgtasks_schema SET version = version")
                        await conn.exec_driver_sql("COMMIT")
                    except BaseException:
                        await conn.exec_driver_sql("ROLLBACK")
                        raise
                finally:
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")

    # -- the store's clock: now() on PostgreSQL, the app's on SQLite ------
    # (times of runs; leases are on `lease_clock`)

    async def anchor_lease_clock(self) -> None:
        """Anchor the lease clock when the lifespan starts: at the database's
        clock on PostgreSQL (so app processes agree however their hosts'
        clocks differ), at the app's on SQLite."""
        if not self.is_pg:
            self.lease_clock.now()
            return
        async with self.read() as conn:
            asked = time.monotonic()
            epoch = await conn.scalar(sa.select(sa.extract("epoch", sa.func.clock_timestamp())))
            answered = time.monotonic()
        if epoch is not None:
            self.lease_clock.anchor(float(epoch), (asked + answered) / 2)

    def wall_now(self) -> datetime:
        """The app's wall clock, as the store's clock on SQLite."""
        return datetime.fromtimestamp(self.wall(), UTC)

    def now(self) -> Any:
        if self.is_pg:
            return sa.func.now()
        return sa.literal(self.wall_now(), sa.DateTime(timezone=True))

    def after(self, seconds: float) -> Any:
        if self.is_pg:
            return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval)
        return sa.literal(self.wall_now() + timedelta(seconds=seconds), sa.DateTime(timezone=True))

    def now_param(self) -> Any:
        """`:now` in a prepared statement: bound on SQLite, the server's on PostgreSQL."""
        if self.is_pg:
            return sa.func.now()
        return sa.bindparam("now", type_=sa.DateTime(timezone=True))

    def clock_params(self) -> dict[str, Any]:
        """The parameters `now_param` needs."""
        return {} if self.is_pg else {"now": self.wall_now()}


def _uncancelled() -> anyio.CancelScope:
    """Shields a connection's checkout, statements, commit and return to the
    pool from cancellation (a worker gone mid-claim, a request cancelled at
    shutdown); the cancellation takes effect once the connection is back.
    Cut short mid-statement, SQLAlchemy terminates the connection, and
    aiosqlite can then stop its thread without closing the SQLite
    connection: an unfinished `UPDATE ... RETURNING` or an open transaction
    kept the write lock until garbage collection, and every writer of the
    file waited out the busy timeout. Everything shielded stays bounded: by
    the pool and busy timeouts on SQLite, by the pool, connect and command
    timeouts on PostgreSQL."""
    return anyio.CancelScope(shield=True)


def _sqlite_pragmas(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin() below decide when a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # a single statement, committed by SQLite itself
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
