"""② The store: every SQL statement, named after the operation it performs.

This is the only module that imports SQLAlchemy. The runs table is the queue;
a trigger appends each state change to the history table in the same
transaction, so every transition is one compare-and-set statement.
SQLite (embedded default) and PostgreSQL (production) differ only where the
clock, the claim's locking and cross-process wake-ups differ.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..errors import (
    ConfigurationError,
    InvalidValue,
    RunFinished,
    RunNotFound,
    SchemaError,
    StoreUnavailable,
)
from ..states import ACTIVE_STATES, RunState
from ..wire import Report, decode_cursor, encode_cursor

__all__ = ["SCHEMA_VERSION", "Store", "decode_cursor", "encode_cursor", "safe_url"]

log = logging.getLogger("fastapi_bgtasks.store")

S = RunState
ACTIVE = [s.value for s in ACTIVE_STATES]
NOTIFY_CHANNEL = "bgtasks_runs"
LOCK_KEY = 0x6267_7461_736B  # "bgtask": the advisory lock migrations hold
CLAIM_LOCK = 0x6267  # with hashtext(worker_id): one claim at a time per worker
MAP_CHUNK = 5000  # runs per INSERT statement of a map (all in one transaction)

metadata = sa.MetaData()

runs = sa.Table(
    "bgtasks_runs",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("rescues", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_rescues", sa.Integer, nullable=False),
    sa.Column("retry_delays", sa.JSON, nullable=False),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("kwargs", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("worker_id", sa.String(200), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reason", sa.String(200), nullable=True),
)

_SCHEDULED = runs.c.state == S.SCHEDULED.value
_ACTIVE = runs.c.state.in_(ACTIVE)

sa.Index(
    "bgtasks_runs_runnable",
    runs.c.task,
    runs.c.priority.desc(),
    runs.c.scheduled_at,
    postgresql_where=_SCHEDULED,
    sqlite_where=_SCHEDULED,
)
sa.Index(
    "bgtasks_runs_leased",
    runs.c.worker_id,
    postgresql_where=_ACTIVE,
    sqlite_where=_ACTIVE,
)
sa.Index(
    "bgtasks_runs_leases",
    runs.c.lease_expires_at,
    postgresql_where=_ACTIVE,
    sqlite_where=_ACTIVE,
)
sa.Index(
    "bgtasks_runs_idempotency",
    runs.c.task,
    runs.c.idempotency_key,
    unique=True,
    postgresql_where=runs.c.idempotency_key.isnot(None),
    sqlite_where=runs.c.idempotency_key.isnot(None),
)
sa.Index("bgtasks_runs_newest", runs.c.created_at, runs.c.id)
sa.Index("bgtasks_runs_state_newest", runs.c.state, runs.c.created_at)

history = sa.Table(
    "bgtasks_run_history",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("run_id", sa.Uuid, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("reason", sa.String(200), nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("bgtasks_run_history_run", history.c.run_id, history.c.id)

schema_table = sa.Table(
    "bgtasks_schema",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

_PG_TRIGGERS = [
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_transition() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
            VALUES (NEW.id, NULL, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
        ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
            INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
            VALUES (NEW.id, OLD.state, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
        END IF;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER bgtasks_runs_history AFTER INSERT OR UPDATE OF state ON bgtasks_runs
    FOR EACH ROW EXECUTE FUNCTION bgtasks_record_transition()
    """,
]
_SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER bgtasks_runs_inserted AFTER INSERT ON bgtasks_runs BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (NEW.id, NULL, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
    END
    """,
    """
    CREATE TRIGGER bgtasks_runs_transition AFTER UPDATE OF state ON bgtasks_runs
    WHEN NEW.state IS NOT OLD.state BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (NEW.id, OLD.state, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
    END
    """,
]


async def _migration_1(conn: AsyncConnection, dialect: str) -> None:
    await conn.run_sync(metadata.create_all)
    for ddl in _PG_TRIGGERS if dialect == "postgresql" else _SQLITE_TRIGGERS:
        await conn.exec_driver_sql(ddl)


# A claim on PostgreSQL in one round trip. The per-worker advisory lock must
# be taken before the snapshot that counts the worker's credit, so it cannot
# share a statement with the claim; inside a function each statement takes
# a fresh snapshot (READ COMMITTED), so one call does both.
_PG_CLAIM_FUNCTION = f"""
CREATE OR REPLACE FUNCTION bgtasks_claim(
    p_worker text, p_tasks text[], p_slots integer, p_lease double precision, p_token text
) RETURNS SETOF bgtasks_runs AS $$
DECLARE
    credit integer;
BEGIN
    PERFORM pg_advisory_xact_lock({CLAIM_LOCK}, hashtext(p_worker));
    SELECT p_slots - count(*) INTO credit FROM bgtasks_runs
    WHERE worker_id = p_worker AND state IN ('PENDING', 'RUNNING');
    IF credit <= 0 THEN
        RETURN;
    END IF;
    -- = ANY(ARRAY(...)): the runs are looked up by id; an IN (subquery)
    -- with a LIMIT the planner cannot see made it scan the whole table.
    -- One index scan per task, each already in claim order, so a backlog
    -- of due runs is never sorted (task = ANY(...) sorted all of it).
    RETURN QUERY
    UPDATE bgtasks_runs SET
        state = 'PENDING', attempt = attempt + 1, worker_id = p_worker,
        lease_token = p_token, lease_expires_at = now() + make_interval(secs => p_lease),
        updated_at = now(), reason = NULL
    WHERE id = ANY(ARRAY(
        SELECT due.id FROM unnest(p_tasks) AS served(name) CROSS JOIN LATERAL (
            SELECT id, priority, scheduled_at FROM bgtasks_runs
            WHERE state = 'SCHEDULED' AND task = served.name AND scheduled_at <= now()
            ORDER BY priority DESC, scheduled_at
            LIMIT credit
            FOR UPDATE SKIP LOCKED) AS due
        ORDER BY due.priority DESC, due.scheduled_at
        LIMIT credit))
    RETURNING *;
END
$$ LANGUAGE plpgsql
"""


# History per statement on PostgreSQL: a bulk report or a claim of many runs
# records its transitions with one INSERT … SELECT over the transition
# tables, not one PL/pgSQL call per row. (A trigger with transition tables
# takes one event, so inserts and updates have one each.)
_PG_STATEMENT_TRIGGERS = [
    "DROP TRIGGER IF EXISTS bgtasks_runs_history ON bgtasks_runs",
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_inserts() RETURNS trigger AS $$
    BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT n.id, NULL, n.state, n.attempt, n.reason, n.updated_at FROM inserted AS n;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_updates() RETURNS trigger AS $$
    BEGIN
        -- A run that went from PENDING to COMPLETED was running: its
        -- history says so (see _SQLITE_TRANSITION_TRIGGER).
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT run_id, from_state, to_state, attempt, reason, at FROM (
            SELECT n.id AS run_id, o.state AS from_state, 'RUNNING' AS to_state,
                   n.attempt, NULL AS reason, n.updated_at AS at, 0 AS step
            FROM updated AS n JOIN previous AS o ON o.id = n.id
            WHERE o.state = 'PENDING' AND n.state = 'COMPLETED'
            UNION ALL
            SELECT n.id,
                   CASE WHEN o.state = 'PENDING' AND n.state = 'COMPLETED'
                        THEN 'RUNNING' ELSE o.state END,
                   n.state, n.attempt, n.reason, n.updated_at, 1
            FROM updated AS n JOIN previous AS o ON o.id = n.id
            WHERE n.state IS DISTINCT FROM o.state
        ) AS transitions
        ORDER BY run_id, step;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER bgtasks_runs_inserted AFTER INSERT ON bgtasks_runs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION bgtasks_record_inserts()
    """,
    """
    CREATE TRIGGER bgtasks_runs_updated AFTER UPDATE ON bgtasks_runs
    REFERENCING OLD TABLE AS previous NEW TABLE AS updated
    FOR EACH STATEMENT EXECUTE FUNCTION bgtasks_record_updates()
    """,
    "DROP FUNCTION IF EXISTS bgtasks_record_transition()",
]


# SQLite's per-row transition trigger, with the same rule as PostgreSQL's:
# a worker that finishes a short run before its RUNNING report is sent sends
# only the COMPLETED one (one statement per batch instead of two), and the
# history still shows the run RUNNING.
_SQLITE_TRANSITION_TRIGGER = [
    "DROP TRIGGER IF EXISTS bgtasks_runs_transition",
    """
    CREATE TRIGGER bgtasks_runs_transition AFTER UPDATE OF state ON bgtasks_runs
    WHEN NEW.state IS NOT OLD.state BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT NEW.id, OLD.state, 'RUNNING', NEW.attempt, NULL, NEW.updated_at
        WHERE OLD.state = 'PENDING' AND NEW.state = 'COMPLETED';
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (
            NEW.id,
            CASE WHEN OLD.state = 'PENDING' AND NEW.state = 'COMPLETED'
                 THEN 'RUNNING' ELSE OLD.state END,
            NEW.state, NEW.attempt, NEW.reason, NEW.updated_at
        );
    END
    """,
]


async def _migration_2(conn: AsyncConnection, dialect: str) -> None:
    """The hot path's schema: PostgreSQL's one-round-trip claim and history
    per statement, a RUNNING step in the history of runs completed straight
    from PENDING, and an index of waiting runs by due time."""
    if dialect == "postgresql":
        await conn.exec_driver_sql(_PG_CLAIM_FUNCTION)
        for ddl in _PG_STATEMENT_TRIGGERS:
            await conn.exec_driver_sql(ddl)
    else:
        for ddl in _SQLITE_TRANSITION_TRIGGER:
            await conn.exec_driver_sql(ddl)
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS bgtasks_runs_due ON bgtasks_runs (scheduled_at) "
        "WHERE state = 'SCHEDULED'"
    )


# Forward-only: never edit a released migration, append a new one.
MIGRATIONS: list[Callable[[AsyncConnection, str], Any]] = [_migration_1, _migration_2]
SCHEMA_VERSION = len(MIGRATIONS)

# SQLAlchemy's and the drivers' ways of saying the database is not there.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    OSError,
)


_CAUGHT: tuple[type[BaseException], ...] = (
    *_UNAVAILABLE,
    sa.exc.DBAPIError,
    UnicodeEncodeError,
)


# SQLSTATEs worth a retry: a database going away, starting up or out of
# room (08, 53300, 57P0x), and transactions aborted by a serialization
# failure or a deadlock (40001, 40P01).
_UNAVAILABLE_STATES = ("08", "53300", "57P01", "57P02", "57P03", "40001", "40P01")


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


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


def safe_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _row(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data.pop("notified", None)
    for key in (
        "created_at",
        "scheduled_at",
        "started_at",
        "finished_at",
        "updated_at",
        "lease_expires_at",
    ):
        if key in data:
            data[key] = _utc(data[key])
    return data


def _new_row(params: dict[str, Any], returned: Any) -> dict[str, Any]:
    """The row a submit stored: what it sent and what the database set (the
    id comes back too, to match rows of a multi-row insert)."""
    created_at = _utc(returned.created_at)
    return {
        "id": returned.id, "task": params["task"], "state": S.SCHEDULED.value, "attempt": 0,
        "max_attempts": params["max_attempts"], "rescues": 0,
        "max_rescues": params["max_rescues"], "retry_delays": params["retry_delays"],
        "timeout_seconds": params["timeout_seconds"], "priority": params.get("priority", 0),
        "args": params["args"], "kwargs": params["kwargs"], "result": None, "error": None,
        "created_at": created_at, "scheduled_at": _utc(returned.scheduled_at),
        "started_at": None, "finished_at": None, "updated_at": created_at, "worker_id": None,
        "lease_token": None, "lease_expires_at": None,
        "idempotency_key": params.get("idempotency_key"), "cancel_requested": False,
        "reason": None,
    }  # fmt: skip


def _stored_text(value: Any) -> str | None:
    """A result as the JSON text to store (non-ASCII kept; JSON escapes
    control characters, NUL included, so PostgreSQL text can hold it), or
    None if JSON cannot carry it (NaN, an infinity, a lone surrogate)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode()
    except ValueError:  # incl. UnicodeEncodeError
        return None
    return text


def _stored_size(value: Any) -> int | None:
    """UTF-8 bytes of a result as stored, or None if JSON cannot carry it."""
    text = _stored_text(value)
    return None if text is None else len(text.encode())


def _clean_text(value: str) -> str:
    return value.encode("utf-8", "replace").decode("utf-8")


@dataclass(eq=False)
class _Submit:
    """One submit waiting for its group commit."""

    params: dict[str, Any]
    notify: bool
    row: dict[str, Any] | None = None
    error: BaseException | None = None


class Store:
    """The runs table and its statements, on one SQLAlchemy async engine
    (two on SQLite: one writer connection and a few readers)."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
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
        if backend == "sqlite" and parsed.drivername != "sqlite+aiosqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if backend == "postgresql" and parsed.drivername != "postgresql+asyncpg":
            parsed = parsed.set(drivername="postgresql+asyncpg")
        if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "fastapi_bgtasks needs a SQLite file (workers and the app share it), "
                "not an in-memory database."
            )
        self.url = parsed
        self.display_url = safe_url(url)
        self.dialect = backend
        self.is_pg = backend == "postgresql"
        self._pool_size = pool_size
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._statements: dict[str, Any] = {}
        # Group commit of concurrent submits (see _insert_batched).
        self._submits: list[_Submit] = []
        self._flushing = False
        self._flushed: anyio.Event | None = None

    # -- lifecycle -------------------------------------------------------

    def _engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        if self._writer is None or self._reader is None:
            raise StoreUnavailable("The store is not open.")
        return self._writer, self._reader

    async def open(self) -> None:
        """Create the engines. Connects lazily: opening cannot fail on a down database."""
        if self._writer is not None:
            return
        dumps = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
        if self.is_pg:
            engine = create_async_engine(
                self.url,
                pool_size=self._pool_size,
                max_overflow=self._pool_size,
                pool_timeout=10,
                pool_recycle=1800,
                json_serializer=dumps,
                connect_args={
                    "server_settings": {"application_name": "fastapi_bgtasks"},
                    "timeout": 10,
                    # A hung database answers 503 instead of holding requests forever.
                    "command_timeout": 15,
                },
            )
            self._writer = self._reader = engine
            return
        # One writer connection per process: SQLite has one writer anyway,
        # and BEGIN IMMEDIATE makes writers queue instead of failing on upgrade.
        self._writer = create_async_engine(
            self.url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=30,
            json_serializer=dumps,
            connect_args={"timeout": 30},
        )
        self._reader = create_async_engine(
            self.url,
            pool_size=4,
            max_overflow=4,
            pool_timeout=30,
            json_serializer=dumps,
            connect_args={"timeout": 30},
        )
        _sqlite_pragmas(self._writer, immediate=True)
        _sqlite_pragmas(self._reader, immediate=False)

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            await writer.dispose()
        if reader is not None and reader is not writer:
            await reader.dispose()

    def _translate(self, exc: BaseException) -> BaseException:
        """A database error as what it means to the caller: the request's
        fault (422), a database to retry later (503), or a bug (as it is)."""
        if _is_bad_value(exc):
            return InvalidValue(
                "A value in this request cannot be stored (a NUL character or a value "
                "out of range)."
            )
        if not _is_unavailable(exc):
            return exc
        return StoreUnavailable(
            f"The task store ({self.display_url}) is unavailable: {type(exc).__name__}"
        )

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the writer: BEGIN IMMEDIATE on SQLite."""
        writer, _ = self._engines()
        try:
            async with writer.begin() as conn:
                yield conn
        except _CAUGHT as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    @asynccontextmanager
    async def _one(self) -> AsyncIterator[AsyncConnection]:
        """For a single write statement: autocommit (one round trip)."""
        writer, _ = self._engines()
        try:
            # One statement is its own transaction on both backends: no
            # BEGIN/COMMIT round trips (on SQLite it still takes the write lock).
            async with writer.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
        except _CAUGHT as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        """For reads. On PostgreSQL in autocommit: each statement has its own
        snapshot anyway (READ COMMITTED), and a BEGIN and a ROLLBACK would
        triple the round trips of a one-statement read."""
        _, reader = self._engines()
        try:
            async with reader.connect() as conn:
                if self.is_pg:
                    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
        except _CAUGHT as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION under a lock; returns the version.

        Two app processes may start at once: PostgreSQL serialises them on an
        advisory lock, SQLite on BEGIN IMMEDIATE.
        """
        async with self._write() as conn:
            if self.is_pg:
                await self._migration_lock(conn)
            current = await self._schema_version(conn)
            if current is None:
                await conn.run_sync(lambda c: schema_table.create(c, checkfirst=True))
                await conn.execute(schema_table.insert().values(version=0))
                current = 0
            if current > SCHEMA_VERSION:
                raise SchemaError(
                    f"The database {self.display_url} has schema version {current}, newer "
                    f"than this fastapi_bgtasks knows ({SCHEMA_VERSION}). Upgrade the package."
                )
            for number in range(current + 1, SCHEMA_VERSION + 1):
                log.info("Applying fastapi_bgtasks migration %d", number)
                await MIGRATIONS[number - 1](conn, self.dialect)
                await conn.execute(schema_table.update().values(version=number))
            return SCHEMA_VERSION

    async def _migration_lock(self, conn: AsyncConnection) -> None:
        """Wait (up to 5 minutes) for another process's migration: polled with
        try-lock, so no single statement outlives the command timeout."""
        with anyio.fail_after(300):
            while True:
                if await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(LOCK_KEY))):
                    return
                await anyio.sleep(0.1)

    async def check_schema(self) -> None:
        """For processes that must not create it: fail clearly when it is missing."""
        if not self.is_pg and not await anyio.Path(self.url.database or "").exists():
            # Connecting would create an empty file; say what is missing instead.
            raise SchemaError(
                f"No fastapi_bgtasks schema in {self.display_url} (no such file). Start the "
                "app once (its lifespan creates it: FastAPI(lifespan=bg.lifespan)), or check "
                "the URL."
            )
        async with self._read() as conn:
            current = await self._schema_version(conn)
        if current is None or current == 0:
            raise SchemaError(
                f"No fastapi_bgtasks schema in {self.display_url}. Start the app once "
                "(its lifespan creates it: FastAPI(lifespan=bg.lifespan)), or check the URL."
            )
        if current != SCHEMA_VERSION:
            raise SchemaError(
                f"The database {self.display_url} has schema version {current}; this "
                f"fastapi_bgtasks needs {SCHEMA_VERSION}. Upgrade the app or the package."
            )

    async def _schema_version(self, conn: AsyncConnection) -> int | None:
        has_table = await conn.run_sync(lambda c: sa.inspect(c).has_table(schema_table.name))
        if not has_table:
            return None
        version = await conn.scalar(sa.select(sa.func.max(schema_table.c.version)))
        return int(version or 0)

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- the clock -------------------------------------------------------

    def _now(self) -> Any:
        """The store's clock: now() on PostgreSQL, the app's clock on SQLite."""
        if self.is_pg:
            return sa.func.now()
        return sa.literal(datetime.now(UTC), sa.DateTime(timezone=True))

    def _after(self, seconds: float) -> Any:
        if self.is_pg:
            return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval)
        return sa.literal(
            datetime.now(UTC) + timedelta(seconds=seconds), sa.DateTime(timezone=True)
        )

    # -- ① submit ---------------------------------------------------------

    async def insert_run(
        self,
        *,
        task: str,
        args: list[Any],
        kwargs: dict[str, Any],
        max_attempts: int,
        max_rescues: int,
        retry_delays: list[float],
        timeout_seconds: float | None,
        priority: int,
        countdown: float | None,
        eta: datetime | None,
        idempotency_key: str | None,
        notify: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """One statement. Returns (row, created); a repeated idempotency key
        returns the stored row, or raises IdempotencyConflict on other arguments.

        `notify` (PostgreSQL): the same statement NOTIFYs other processes,
        for submitters with no lifespan to coalesce notifications: one round
        trip, delivered when the insert commits."""
        params: dict[str, Any] = {
            "id": uuid.uuid4(),
            "task": task,
            "max_attempts": max_attempts,
            "max_rescues": max_rescues,
            "retry_delays": retry_delays,
            "timeout_seconds": timeout_seconds,
            "priority": priority,
            "args": args,
            "kwargs": kwargs,
            "idempotency_key": idempotency_key,
            "eta": eta.astimezone(UTC) if eta is not None else None,
        }
        if self.is_pg:
            params["delay"] = timedelta(seconds=countdown or 0)
        else:
            now = datetime.now(UTC)
            params["now"] = now
            params["scheduled"] = params["eta"] or now + timedelta(seconds=countdown or 0)
        if idempotency_key is None:
            return await self._insert_batched(params, notify=notify and self.is_pg), True
        insert = self._insert_statement(idempotent=True, notify=notify and self.is_pg)
        async with self._one() as conn:
            row = (await conn.execute(insert, params)).first()
        if row is not None:
            return _row(row), True
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(runs).where(
                        runs.c.task == task, runs.c.idempotency_key == idempotency_key
                    )
                )
            ).first()
        if row is None:  # deleted between the two statements: vanishingly rare
            raise StoreUnavailable("The run for this idempotency key changed; try again.")
        return _row(row), False

    async def insert_runs(
        self,
        *,
        task: str,
        calls: Sequence[tuple[list[Any], dict[str, Any]]],
        max_attempts: int,
        max_rescues: int,
        retry_delays: list[float],
        timeout_seconds: float | None,
        notify: bool = False,
    ) -> list[dict[str, Any]]:
        """Many runs of one task (a `map`), all or none: one transaction,
        one statement per MAP_CHUNK runs, the varying part (id, arguments)
        sent as a single JSON parameter so the statement never changes."""
        if not calls:
            return []
        ids = [uuid.uuid4() for _ in calls]
        common: dict[str, Any] = {
            "task": task,
            "max_attempts": max_attempts,
            "max_rescues": max_rescues,
            "retry_delays": json.dumps(retry_delays),
            "timeout": timeout_seconds,
        }
        statement = self._insert_many_statement()
        returned: dict[uuid.UUID, Any] = {}
        async with self._write() as conn:
            for start in range(0, len(calls), MAP_CHUNK):
                chunk = range(start, min(start + MAP_CHUNK, len(calls)))
                batch = [[ids[i].hex if not self.is_pg else str(ids[i]), *calls[i]] for i in chunk]
                params = {**common, "batch": json.dumps(batch, separators=(",", ":"))}
                if not self.is_pg:
                    params["now"] = datetime.now(UTC)
                returned.update((row.id, row) for row in await conn.execute(statement, params))
            if notify and self.is_pg:
                await conn.execute(
                    sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("task", task)))
                )
        sent = {
            "task": task,
            "max_attempts": max_attempts,
            "max_rescues": max_rescues,
            "retry_delays": retry_delays,
            "timeout_seconds": timeout_seconds,
        }
        return [
            _new_row({**sent, "args": args, "kwargs": kwargs}, returned[run_id])
            for run_id, (args, kwargs) in zip(ids, calls, strict=True)
        ]

    def _insert_many_statement(self) -> Any:
        statement = self._statements.get("insert_many")
        if statement is not None:
            return statement
        columns = (
            "id, task, state, attempt, max_attempts, rescues, max_rescues, retry_delays, "
            "timeout_seconds, priority, args, kwargs, created_at, scheduled_at, updated_at, "
            "cancel_requested"
        )
        if self.is_pg:
            sql = f"""
                INSERT INTO bgtasks_runs ({columns})
                SELECT CAST(e->>0 AS uuid), CAST(:task AS text), 'SCHEDULED', 0,
                       CAST(:max_attempts AS integer), 0, CAST(:max_rescues AS integer),
                       CAST(:retry_delays AS json), CAST(:timeout AS double precision), 0,
                       e->1, e->2, now(), now(), now(), false
                FROM json_array_elements(CAST(:batch AS json)) AS e
                RETURNING id, created_at, scheduled_at
            """
            text = sa.text(sql)
        else:
            sql = f"""
                INSERT INTO bgtasks_runs ({columns})
                SELECT json_extract(value, '$[0]'), :task, 'SCHEDULED', 0, :max_attempts, 0,
                       :max_rescues, :retry_delays, :timeout, 0, json_extract(value, '$[1]'),
                       json_extract(value, '$[2]'), :now, :now, :now, 0
                FROM json_each(:batch)
                RETURNING id, created_at, scheduled_at
            """
            text = sa.text(sql).bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))
        statement = self._statements["insert_many"] = text.columns(
            sa.column("id", sa.Uuid),
            sa.column("created_at", sa.DateTime(timezone=True)),
            sa.column("scheduled_at", sa.DateTime(timezone=True)),
        )
        return statement

    async def _insert_batched(self, params: dict[str, Any], *, notify: bool) -> dict[str, Any]:
        """Group commit: submits that arrive while an insert is in flight
        go together in the next one, a single multi-row statement. A lone
        submit is one statement as before; fifty concurrent ones (a busy
        app) cost a few statements instead of fifty."""
        item = _Submit(params, notify)
        self._submits.append(item)
        while item.row is None and item.error is None:
            if self._flushing:
                if self._flushed is None:
                    self._flushed = anyio.Event()
                try:
                    await self._flushed.wait()
                except BaseException:
                    # Cancelled before a leader took it: it must not be
                    # stored behind its caller's back by a later group.
                    if item in self._submits:
                        self._submits.remove(item)
                    raise
                continue
            self._flushing = True
            batch, self._submits = self._submits, []
            try:
                # Shielded: the batch holds other callers' runs, which must
                # be stored (or refused) whatever happens to this caller.
                with anyio.CancelScope(shield=True):
                    await self._flush_submits(batch)
            finally:
                self._flushing = False
                flushed, self._flushed = self._flushed, None
                if flushed is not None:
                    flushed.set()
        if item.error is not None:
            raise item.error
        assert item.row is not None
        return item.row

    async def _flush_submits(self, batch: list[_Submit]) -> None:
        if len(batch) == 1:
            item = batch[0]
            insert = self._insert_statement(idempotent=False, notify=item.notify)
            try:
                async with self._one() as conn:
                    row = (await conn.execute(insert, item.params)).one()
                item.row = _new_row(item.params, row)
            except Exception as exc:
                item.error = exc
            return
        try:
            # One transaction: a large group goes as several INSERTs, and a
            # refusal in a later one must leave none stored before the
            # submits are retried alone.
            async with self._write() as conn:
                result = await conn.execute(
                    self._insert_statement(idempotent=False), [i.params for i in batch]
                )
                returned = {row.id: row for row in result}
                stored = {
                    i.params["id"]: _new_row(i.params, returned[i.params["id"]]) for i in batch
                }
        except InvalidValue:
            # One bad value fails the whole statement and nothing was
            # stored: each submit alone, so only the bad one is refused.
            for item in batch:
                await self._flush_submits([item])
            return
        except Exception as exc:
            for item in batch:
                item.error = exc
            return
        for item in batch:
            item.row = stored[item.params["id"]]
        tasks = sorted({i.params["task"] for i in batch if i.notify})
        if tasks:
            try:
                await self.notify(tasks)
            except StoreUnavailable:
                pass  # the runs are committed; feeds find them at their next poll

    def _insert_statement(self, *, idempotent: bool, notify: bool = False) -> Any:
        """Built once per store: a submit only binds parameters (the hot path)."""
        key = f"insert:{idempotent}:{notify}"
        statement = self._statements.get(key)
        if statement is not None:
            return statement
        if self.is_pg:
            now: Any = sa.func.now()
            scheduled: Any = sa.func.coalesce(
                sa.bindparam("eta", type_=sa.DateTime(timezone=True)),
                sa.func.now() + sa.bindparam("delay", type_=sa.Interval),
            )
        else:
            now = sa.bindparam("now", type_=sa.DateTime(timezone=True))
            scheduled = sa.bindparam("scheduled", type_=sa.DateTime(timezone=True))
        columns = (
            "id", "task", "max_attempts", "max_rescues", "retry_delays", "timeout_seconds",
            "priority", "args", "kwargs", "idempotency_key",
        )  # fmt: skip
        values: dict[str, Any] = {c: sa.bindparam(c, type_=runs.c[c].type) for c in columns}
        values.update(
            state=S.SCHEDULED.value,
            attempt=0,
            rescues=0,
            cancel_requested=False,
            created_at=now,
            updated_at=now,
            scheduled_at=scheduled,
        )
        insert = (postgresql.insert if self.is_pg else sqlite.insert)(runs).values(values)
        if idempotent:
            insert = insert.on_conflict_do_nothing(
                index_elements=[runs.c.task, runs.c.idempotency_key],
                index_where=runs.c.idempotency_key.isnot(None),
            )
        # A new run is what the submit sent plus three values the database
        # sets: returning only those spares decoding 25 columns per submit.
        returned = (runs.c.id, runs.c.task, runs.c.created_at, runs.c.scheduled_at)
        statement = insert.returning(*(runs.c if idempotent else returned))
        if notify:
            inserted = statement.cte("inserted")
            notified = sa.func.pg_notify(NOTIFY_CHANNEL, inserted.c.task).label("notified")
            statement = sa.select(*inserted.c, notified)
        self._statements[key] = statement
        return statement

    # -- ⑥ status ---------------------------------------------------------

    async def get_run(self, run_id: uuid.UUID) -> dict[str, Any] | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).first()
        return _row(row) if row is not None else None

    async def list_runs(
        self,
        *,
        state: RunState | None,
        task: str | None,
        limit: int,
        cursor: tuple[datetime, uuid.UUID] | None,
    ) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(runs.c.state == state.value)
        if task is not None:
            query = query.where(runs.c.task == task)
        if cursor is not None:
            at, run_id = cursor
            query = query.where(
                sa.or_(
                    runs.c.created_at < at,
                    sa.and_(runs.c.created_at == at, runs.c.id < run_id),
                )
            )
        async with self._read() as conn:
            return [_row(r) for r in await conn.execute(query)]

    async def run_history(self, run_id: uuid.UUID) -> list[dict[str, Any]]:
        query = sa.select(history).where(history.c.run_id == run_id).order_by(history.c.id)
        async with self._read() as conn:
            rows = [_row(r) for r in await conn.execute(query)]
        for r in rows:
            r["at"] = _utc(r["at"])
        return rows

    async def cancel_run(self, run_id: uuid.UUID) -> dict[str, Any]:
        """SCHEDULED → CANCELLED at once; a leased run is flagged for its
        worker, which stops it and reports CANCELLED."""
        now = self._now()
        async with self._write() as conn:
            row = (
                await conn.execute(
                    runs.update()
                    .where(runs.c.id == run_id, _SCHEDULED)
                    .values(
                        state=S.CANCELLED.value,
                        finished_at=now,
                        updated_at=now,
                        reason="cancelled",
                        cancel_requested=True,
                    )
                    .returning(*runs.c)
                )
            ).first()
            if row is None:
                row = (
                    await conn.execute(
                        runs.update()
                        .where(runs.c.id == run_id, _ACTIVE)
                        .values(cancel_requested=True)
                        .returning(*runs.c)
                    )
                ).first()
            if row is None:
                row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).first()
                if row is None:
                    raise RunNotFound()
                raise RunFinished(f"Run {run_id} already ended {row.state}; nothing to cancel.")
        return _row(row)

    # -- ③ feed -----------------------------------------------------------

    _DELIVERY = (
        runs.c.id,
        runs.c.task,
        runs.c.attempt,
        runs.c.lease_token,
        runs.c.args,
        runs.c.kwargs,
        runs.c.timeout_seconds,
        runs.c.priority,
        runs.c.scheduled_at,
    )

    async def claim(
        self, *, worker_id: str, tasks: Sequence[str], slots: int, lease_seconds: float
    ) -> list[dict[str, Any]]:
        """Lease up to this worker's free credit of due runs, in one statement.

        Credit is slots minus the runs already leased to the worker, counted
        in the same statement, so it holds across app processes. The attempt
        is counted here; the lease token fences every later report.
        """
        if self.is_pg:
            # Two claims for one worker (a reconnect overlapping its old
            # stream, perhaps on another app process) would each count the
            # other's rows as free: the function serialises them on a
            # per-worker lock taken before the claim's snapshot.
            statement: Any = self._statements.get("claim")
            if statement is None:
                claimed = sa.func.bgtasks_claim(
                    sa.bindparam("worker", type_=sa.String),
                    sa.bindparam("tasks", type_=postgresql.ARRAY(sa.String)),
                    sa.bindparam("slots", type_=sa.Integer),
                    sa.bindparam("lease", type_=sa.Float),
                    sa.bindparam("token", type_=sa.String),
                ).table_valued(*(sa.column(c.name, c.type) for c in self._DELIVERY))
                statement = self._statements["claim"] = sa.select(*claimed.c)
            params = {
                "worker": worker_id,
                "tasks": list(tasks),
                "slots": slots,
                "lease": lease_seconds,
                "token": uuid.uuid4().hex,
            }
            async with self._one() as conn:
                rows = [_row(r) for r in await conn.execute(statement, params)]
        else:
            names = tuple(sorted(set(tasks)))
            statement = self._statements.get(f"claim:{names}")
            if statement is None:
                statement = self._sqlite_claim(names)
                if len(self._statements) < 100:  # task sets come from clients: bounded
                    self._statements[f"claim:{names}"] = statement
            now = datetime.now(UTC)
            params = {
                "worker": worker_id,
                "slots": slots,
                "now": now,
                "token": uuid.uuid4().hex,
                "expires": now + timedelta(seconds=lease_seconds),
            }
            async with self._one() as conn:
                rows = [_row(r) for r in await conn.execute(statement, params)]
        rows.sort(key=lambda r: (-r["priority"], r["scheduled_at"]))
        return rows

    def _sqlite_claim(self, tasks: tuple[str, ...]) -> Any:
        """SQLite's claim for these tasks, built once: credit counted in the
        statement, one index scan per task in claim order (task IN (...)
        would sort every waiting run of those tasks on each claim)."""
        now = sa.bindparam("now", type_=sa.DateTime(timezone=True))
        held = (
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.worker_id == sa.bindparam("worker"), _ACTIVE)
            .scalar_subquery()
        )
        credit = sa.func.max(0, sa.bindparam("slots", type_=sa.Integer) - held)
        branches = [
            sa.select(runs.c.id, runs.c.priority, runs.c.scheduled_at)
            .where(_SCHEDULED, runs.c.task == task, runs.c.scheduled_at <= now)
            .order_by(runs.c.priority.desc(), runs.c.scheduled_at)
            .limit(credit)
            for task in tasks
        ]
        if len(branches) == 1:
            due = branches[0].with_only_columns(runs.c.id)
        else:
            merged = sa.union_all(*(sa.select(*b.subquery().c) for b in branches)).subquery()
            due = (
                sa.select(merged.c.id)
                .order_by(merged.c.priority.desc(), merged.c.scheduled_at)
                .limit(credit)
            )
        return (
            runs.update()
            .where(runs.c.id.in_(due.scalar_subquery()))
            .values(
                state=S.PENDING.value,
                attempt=runs.c.attempt + 1,
                worker_id=sa.bindparam("worker"),
                lease_token=sa.bindparam("token"),
                lease_expires_at=sa.bindparam("expires", type_=sa.DateTime(timezone=True)),
                updated_at=now,
                reason=None,
            )
            .returning(*self._DELIVERY)
        )

    async def leased_to(self, worker_id: str, tasks: Sequence[str]) -> list[dict[str, Any]]:
        """Runs still PENDING under this worker: re-sent when its feed reconnects."""
        query = (
            sa.select(*self._DELIVERY)
            .where(
                runs.c.worker_id == worker_id,
                runs.c.state == S.PENDING.value,
                runs.c.task.in_(list(tasks)),
            )
            .order_by(runs.c.priority.desc(), runs.c.scheduled_at)
        )
        async with self._read() as conn:
            return [_row(r) for r in await conn.execute(query)]

    async def release_unsent(self, leases: Sequence[tuple[uuid.UUID, str]]) -> int:
        """Claimed but never written to the stream: back to SCHEDULED, the
        attempt not spent."""
        if not leases:
            return 0
        released = 0
        async with self._write() as conn:
            for run_id, token in leases:
                result = await conn.execute(
                    runs.update()
                    .where(
                        runs.c.id == run_id,
                        runs.c.lease_token == token,
                        runs.c.state == S.PENDING.value,
                    )
                    .values(
                        state=S.SCHEDULED.value,
                        attempt=runs.c.attempt - 1,
                        worker_id=None,
                        lease_token=None,
                        lease_expires_at=None,
                        updated_at=self._now(),
                        reason="released_unsent",
                    )
                )
                released += result.rowcount
        return released

    async def next_due(self, tasks: Sequence[str]) -> datetime | None:
        """When the earliest run of these tasks not yet due becomes due (runs
        already due are the claim's business). Read from the index of waiting
        runs by due time, from now on: a backlog of due runs costs nothing."""
        query = self._statements.get("next_due")
        if query is None:
            now = (
                sa.func.now()
                if self.is_pg
                else sa.bindparam("now", type_=sa.DateTime(timezone=True))
            )
            query = self._statements["next_due"] = (
                sa.select(runs.c.scheduled_at)
                .where(
                    _SCHEDULED,
                    runs.c.scheduled_at > now,
                    runs.c.task.in_(sa.bindparam("tasks", expanding=True)),
                )
                .order_by(runs.c.scheduled_at)
                .limit(1)
            )
        params: dict[str, Any] = {"tasks": list(tasks)}
        if not self.is_pg:
            params["now"] = datetime.now(UTC)
        async with self._read() as conn:
            value = await conn.scalar(query, params)
        if isinstance(value, str):  # defensive: SQLite text timestamps
            value = datetime.fromisoformat(value)
        return _utc(value)

    async def clock(self) -> datetime:
        """The store's current time (for sleeping until a run is due)."""
        if not self.is_pg:
            return datetime.now(UTC)
        async with self._read() as conn:
            value = await conn.scalar(sa.select(sa.func.now()))
        return _utc(value) or datetime.now(UTC)

    # -- ⑤ reports --------------------------------------------------------

    async def apply_reports(
        self, reports: Sequence[Report], *, max_result_bytes: int
    ) -> list[tuple[str, dict[str, Any] | None]]:
        """Apply a worker's batch; one outcome per report.

        The common reports (RUNNING, and COMPLETED with a result that fits)
        are applied one statement per kind, however many there are; the rest
        one by one. Kinds go in lifecycle order (RUNNING first), so a run's
        RUNNING and COMPLETED in one batch both land.
        """
        outcomes: list[tuple[str, dict[str, Any] | None]] = [("unknown", None)] * len(reports)
        # Rows are locked in id order, as heartbeats lock them, so a batch and
        # a heartbeat of one worker never deadlock.
        order = sorted(range(len(reports)), key=lambda i: reports[i].run_id)
        bulk: dict[str, list[int]] = {"RUNNING": [], "COMPLETED": []}
        texts: dict[int, str | None] = {}
        seen: set[tuple[str, uuid.UUID]] = set()
        rest: list[int] = []
        for i in order:
            report = reports[i]
            key = (report.state, report.run_id)
            if report.state not in bulk or key in seen:
                rest.append(i)
                continue
            if report.state == "COMPLETED":
                text = _stored_text(report.result)
                if text is None or len(text.encode()) > max_result_bytes:
                    rest.append(i)  # refused one by one, with the reason stored
                    continue
                texts[i] = None if text == "null" else text  # SQL NULL, as one by one
            seen.add(key)
            bulk[report.state].append(i)
        # The bulk statements need no transaction: each report stands alone,
        # and each statement commits (and releases the rows it locked, in id
        # order) before the next; a worker resends a batch whose answer it
        # did not get, and repeats come back `duplicate`. Reports applied
        # one by one go in one transaction that locks the batch first.
        session = self._one() if not rest else self._write()
        async with session as conn:
            if self.is_pg and rest:
                # Kinds are applied one after the other, each locking its
                # rows: lock the whole batch first, in id order.
                await conn.execute(
                    sa.select(runs.c.id)
                    .where(runs.c.id.in_(sorted({r.run_id for r in reports})))
                    .order_by(runs.c.id)
                    .with_for_update()
                )
            for state, group in bulk.items():
                if not group:
                    continue
                accepted = await self._apply_bulk(
                    conn, state, [reports[i] for i in group], [texts.get(i) for i in group]
                )
                for i in group:
                    report = reports[i]
                    if report.run_id in accepted:
                        outcomes[i] = ("accepted", {"id": report.run_id, "state": state})
                    else:
                        outcomes[i] = (await self._classify(conn, report, report.result), None)
            for i in rest:
                outcomes[i] = await self._apply(conn, reports[i], max_result_bytes)
        return outcomes

    async def _apply_bulk(
        self,
        conn: AsyncConnection,
        state: str,
        reports: Sequence[Report],
        results: Sequence[str | None],
    ) -> set[uuid.UUID]:
        """RUNNING or COMPLETED reports of distinct runs in one statement;
        returns the runs it changed (the others are classified by the caller)."""
        statement = self._bulk_statement(state)
        if self.is_pg:
            params: dict[str, Any] = {
                "ids": [r.run_id for r in reports],
                "tokens": [r.lease_token for r in reports],
                "results": list(results),
            }
        else:
            batch = [
                [r.run_id.hex, r.lease_token, text]
                for r, text in zip(reports, results, strict=True)
            ]
            params = {"batch": json.dumps(batch), "now": datetime.now(UTC)}
        return {row.id for row in await conn.execute(statement, params)}

    async def _apply(
        self, conn: AsyncConnection, report: Report, max_result_bytes: int
    ) -> tuple[str, dict[str, Any] | None]:
        now = self._now()
        mine = sa.and_(runs.c.id == report.run_id, runs.c.lease_token == report.lease_token)
        values: dict[str, Any]
        state = report.state
        result = report.result
        error = report.error.model_dump() if report.error else None
        if error is not None:
            # Plain text only, valid UTF-8, whatever the worker sent.
            error = {k: _clean_text(v) if isinstance(v, str) else v for k, v in error.items()}
        size = _stored_size(result) if state == "COMPLETED" else 0
        if size is None:
            state, result = "FAILED", None
            error = {
                "type": "NotSerializable",
                "message": "The result holds NaN, an infinity or text that is not valid "
                "Unicode, which JSON cannot carry.",
                "traceback": None,
            }
        elif size > max_result_bytes:
            state, result = "FAILED", None
            error = {
                "type": "ResultTooLarge",
                "message": f"The result is larger than max_result_bytes ({max_result_bytes}).",
                "traceback": None,
            }
        if state == "RUNNING":
            where = [mine, runs.c.state == S.PENDING.value]
            values = {"state": S.RUNNING.value, "started_at": now, "updated_at": now}
        elif state == "COMPLETED":
            where = [mine, _ACTIVE]
            values = {
                "state": S.COMPLETED.value,
                "result": result,
                "error": None,
                "started_at": sa.func.coalesce(runs.c.started_at, now),
                "finished_at": now,
                "lease_expires_at": None,
                "updated_at": now,
                "reason": None,
            }
        elif state == "CANCELLED":
            where = [mine, _ACTIVE]
            values = {
                "state": S.CANCELLED.value,
                "finished_at": now,
                "lease_expires_at": None,
                "updated_at": now,
                "reason": "cancelled",
            }
        elif state == "RELEASED":
            where = [mine, _ACTIVE]
            never_started = runs.c.state == S.PENDING.value
            values = {
                # A handed-back run that someone asked to cancel stays cancelled.
                "state": sa.case(
                    (runs.c.cancel_requested, S.CANCELLED.value), else_=S.SCHEDULED.value
                ),
                "finished_at": sa.case((runs.c.cancel_requested, now), else_=None),
                "attempt": sa.case((never_started, runs.c.attempt - 1), else_=runs.c.attempt),
                "rescues": sa.case((never_started, runs.c.rescues), else_=runs.c.rescues + 1),
                "scheduled_at": now,
                "worker_id": None,
                "lease_expires_at": None,
                "updated_at": now,
                "reason": "handed_back",
            }
        else:  # FAILED: retry after the back-off if any is left
            current = (
                await conn.execute(
                    sa.select(
                        runs.c.attempt,
                        runs.c.rescues,
                        runs.c.max_attempts,
                        runs.c.retry_delays,
                        runs.c.cancel_requested,
                    ).where(mine, _ACTIVE)
                )
            ).first()
            if current is None:
                return await self._classify(conn, report, result), None
            failures = current.attempt - current.rescues
            # A worker that does not know the task cannot do better next time.
            retryable = not (error and error.get("type") == "UnknownTask")
            if retryable and failures < current.max_attempts and not current.cancel_requested:
                delays = current.retry_delays or [0.0]
                delay = float(delays[min(failures - 1, len(delays) - 1)])
                values = {
                    "state": S.SCHEDULED.value,
                    "error": error,
                    "scheduled_at": self._after(delay) if delay > 0 else now,
                    "worker_id": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "reason": f"retry: {error['type'] if error else 'failed'}"[:200],
                }
            else:
                values = {
                    "state": S.FAILED.value,
                    "error": error,
                    "started_at": sa.func.coalesce(runs.c.started_at, now),
                    "finished_at": now,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "reason": "failed",
                }
            where = [mine, _ACTIVE]
        row = (
            await conn.execute(
                runs.update().where(*where).values(values).returning(runs.c.id, runs.c.state)
            )
        ).first()
        if row is not None:
            return "accepted", {"id": row.id, "state": row.state}
        return await self._classify(conn, report, result), None

    def _bulk_statement(self, state: str) -> Any:
        """The UPDATE … FROM of a kind of bulk report, built once per store."""
        key = f"bulk:{state}"
        statement = self._statements.get(key)
        if statement is not None:
            return statement
        if state == "RUNNING":
            sets = "state = 'RUNNING', started_at = :now, updated_at = :now"
            allowed = "('PENDING')"
        else:
            sets = (
                "state = 'COMPLETED', result = {result}, error = NULL, "
                "started_at = coalesce(r.started_at, :now), finished_at = :now, "
                "lease_expires_at = NULL, updated_at = :now, reason = NULL"
            )
            allowed = "('PENDING', 'RUNNING')"
        if self.is_pg:
            sql = f"""
                UPDATE bgtasks_runs AS r SET {sets.format(result="CAST(v.result AS json)")}
                FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[]),
                            CAST(:results AS text[])) AS v(id, token, result)
                WHERE r.id = v.id AND r.lease_token = v.token AND r.state IN {allowed}
                  AND r.id IN (SELECT id FROM bgtasks_runs WHERE id = ANY(CAST(:ids AS uuid[]))
                               ORDER BY id FOR UPDATE)
                RETURNING r.id
            """.replace(":now", "now()")
            statement = sa.text(sql).columns(sa.column("id", sa.Uuid))
        else:
            sql = f"""
                UPDATE bgtasks_runs AS r SET {sets.format(result="v.result")}
                FROM (SELECT json_extract(value, '$[0]') AS id,
                             json_extract(value, '$[1]') AS token,
                             json_extract(value, '$[2]') AS result
                      FROM json_each(:batch)) AS v
                WHERE r.id = v.id AND r.lease_token = v.token AND r.state IN {allowed}
                RETURNING id
            """
            statement = (
                sa.text(sql)
                .bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))
                .columns(sa.column("id", sa.Uuid))
            )
        self._statements[key] = statement
        return statement

    async def _classify(self, conn: AsyncConnection, report: Report, result: Any) -> str:
        """Why a report changed nothing: a repeat, a lost lease, or no such run."""
        row = (
            await conn.execute(
                sa.select(runs.c.state, runs.c.lease_token, runs.c.result).where(
                    runs.c.id == report.run_id
                )
            )
        ).first()
        if row is None:
            return "unknown"
        if row.lease_token != report.lease_token:
            return "stale"
        repeats = {
            "RUNNING": {S.RUNNING.value},
            "COMPLETED": {S.COMPLETED.value},
            "CANCELLED": {S.CANCELLED.value},
            "FAILED": {S.FAILED.value, S.SCHEDULED.value},
            "RELEASED": {S.SCHEDULED.value, S.CANCELLED.value},
        }[report.state]
        if row.state in repeats and (report.state != "COMPLETED" or row.result == result):
            return "duplicate"
        if report.state == "RUNNING" and row.state in (S.COMPLETED.value, S.FAILED.value):
            return "duplicate"  # a late start report for a run already settled by this lease
        return "stale"

    async def heartbeat(
        self, *, worker_id: str, held: Sequence[tuple[uuid.UUID, str]], lease_seconds: float
    ) -> tuple[list[uuid.UUID], list[uuid.UUID], list[uuid.UUID]]:
        """Renew this worker's leases in one statement.

        Returns (renewed, stop, cancel): `stop` lists runs the worker no longer
        holds (drop them), `cancel` runs a user asked to cancel.
        """
        if not held:
            return [], [], []
        tokens = {run_id: token for run_id, token in held}
        mine = sa.and_(
            runs.c.worker_id == worker_id,
            _ACTIVE,
            # (id, token) pairs: a stale token renews nothing.
            sa.tuple_(runs.c.id, runs.c.lease_token).in_(list(tokens.items())),
        )
        if self.is_pg:
            # Lock in id order, as report batches do: the two never deadlock.
            locked = sa.select(runs.c.id).where(mine).order_by(runs.c.id).with_for_update()
            mine = runs.c.id.in_(locked.scalar_subquery())
        statement = (
            runs.update()
            .where(mine)
            .values(lease_expires_at=self._after(lease_seconds))
            .returning(runs.c.id, runs.c.lease_token, runs.c.cancel_requested)
        )
        async with self._one() as conn:
            rows = list(await conn.execute(statement))
        renewed = [r.id for r in rows if tokens.get(r.id) == r.lease_token]
        cancel = [r.id for r in rows if r.cancel_requested and tokens.get(r.id) == r.lease_token]
        kept = set(renewed)
        stop = [run_id for run_id in tokens if run_id not in kept]
        return renewed, stop, cancel

    # -- the reaper -------------------------------------------------------

    async def reap_expired(self) -> list[tuple[uuid.UUID, str]]:
        """(run id, new state) of each run taken back from its worker."""
        return [(run_id, state) for run_id, state, _ in await self.reap_expired_runs()]

    async def reap_expired_runs(
        self, on_lost: Callable[[set[str]], None] | None = None
    ) -> list[tuple[uuid.UUID, str, str | None]]:
        """Runs whose lease expired go back to SCHEDULED without spending a
        retry, or end CRASHED once their rescues are spent. A conditional
        update: harmless when several app processes run it at once. Returns
        (run id, new state, the worker that lost it)."""
        now = self._now()
        cancelled = runs.c.cancel_requested
        exhausted = runs.c.rescues >= runs.c.max_rescues
        ends = sa.or_(cancelled, exhausted)
        lost_error = {
            "type": "WorkerLost",
            "message": "The worker running this run stopped renewing its lease "
            "(it crashed, hung or lost its connection) and the run's rescues are spent.",
            "traceback": None,
        }
        statement = (
            runs.update()
            .where(_ACTIVE, runs.c.lease_expires_at < now)
            .values(
                state=sa.case(
                    (cancelled, S.CANCELLED.value),
                    (exhausted, S.CRASHED.value),
                    else_=S.SCHEDULED.value,
                ),
                rescues=sa.case((ends, runs.c.rescues), else_=runs.c.rescues + 1),
                error=sa.case(
                    (sa.and_(exhausted, sa.not_(cancelled)), sa.literal(lost_error, sa.JSON)),
                    else_=runs.c.error,
                ),
                finished_at=sa.case((ends, now), else_=None),
                scheduled_at=sa.case((ends, runs.c.scheduled_at), else_=now),
                worker_id=sa.case((ends, runs.c.worker_id), else_=None),
                # The lease is gone: any later report under it is stale.
                lease_token=None,
                lease_expires_at=None,
                updated_at=now,
                reason=sa.case((cancelled, "cancelled"), else_="worker_lost"),
            )
            .returning(runs.c.id, runs.c.state)
        )
        # The worker that lost each run, read before the update clears it.
        lost_by = sa.select(runs.c.id, runs.c.worker_id).where(
            _ACTIVE, runs.c.lease_expires_at < now
        )
        async with self._write() as conn:
            workers = {r.id: r.worker_id for r in await conn.execute(lost_by)}
            if not workers:
                return []
            if on_lost is not None:
                # Before the runs become claimable again: a feed of a lost
                # worker checks this mark after each claim.
                on_lost({w for w in workers.values() if w is not None})
            return [(r.id, r.state, workers.get(r.id)) for r in await conn.execute(statement)]

    # -- cross-process wake-ups -------------------------------------------

    async def notify(self, tasks: Sequence[str]) -> None:
        """Tell other app processes that runs of these tasks are waiting.
        Sent after the submit's commit, outside its transaction."""
        if not self.is_pg or not tasks:
            return
        # Listeners re-claim for every task they serve whatever the payload:
        # one NOTIFY carries the whole coalesced set, within NOTIFY's size limit.
        payload = ",".join(tasks)[:7000]
        statement = sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("payload", payload)))
        async with self._one() as conn:
            await conn.execute(statement)

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call `on_change(task or None)` whenever another process writes runs.

        PostgreSQL: LISTEN on a dedicated connection, re-opened with back-off;
        every (re)connect is followed by `on_change(None)` (a full claim pass).
        SQLite: PRAGMA data_version on a dedicated connection.
        Runs until cancelled.
        """
        if self.is_pg:
            await self._watch_pg(on_change)
        else:
            await self._watch_sqlite(on_change)

    async def _watch_pg(self, on_change: Callable[[str | None], None]) -> None:
        import asyncpg

        delay = 0.1
        url = self.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    dsn, timeout=10, server_settings={"application_name": "fastapi_bgtasks"}
                )
                lost = anyio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(
                    NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: on_change(payload)
                )
                on_change(None)
                delay = 0.1
                while not lost.is_set():
                    with anyio.move_on_after(5):
                        await lost.wait()
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=5)  # notice a half-open link
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("Wake-up listener lost the database (%s); reconnecting", exc)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        await conn.close(timeout=2)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _watch_sqlite(self, on_change: Callable[[str | None], None]) -> None:
        import aiosqlite

        path = self.url.database or ""
        while True:
            db = None
            try:
                # aiosqlite starts a thread per connection: opening and closing
                # are shielded so a cancel mid-way cannot strand that thread.
                with anyio.CancelScope(shield=True):
                    db = await aiosqlite.connect(path, timeout=30)
                assert db is not None
                last = None
                while True:
                    async with db.execute("PRAGMA data_version") as cursor:
                        row = await cursor.fetchone()
                    version = row[0] if row else None
                    if last is not None and version != last:
                        on_change(None)
                    last = version
                    await anyio.sleep(0.02)
            except (OSError, aiosqlite.Error) as exc:
                log.warning("Wake-up watcher lost the SQLite file (%s); retrying", exc)
            finally:
                if db is not None:
                    with anyio.CancelScope(shield=True):
                        await db.close()
            await anyio.sleep(1.0)


def _sqlite_pragmas(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin() below decide when a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # a single statement, committed by SQLite itself
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
