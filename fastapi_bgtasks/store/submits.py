"""① Submit: new runs into the queue. A lone submit is one INSERT; submits
that arrive together share one (group commit); a map inserts many runs of
one task from a single JSON parameter per MAP_CHUNK runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..errors import InvalidValue, StoreUnavailable
from ..states import RunState
from .dialect import Database
from .fastpath import FastPath
from .rows import RunRow, Submitted, new_row, run_row
from .schema import runs
from .sql import INSERT_MANY

__all__ = ["MAP_CHUNK", "NOTIFY_CHANNEL", "Submits"]

NOTIFY_CHANNEL = "bgtasks_runs"
MAP_CHUNK = 5000  # runs per INSERT statement of a map (all in one transaction)


@dataclass(eq=False)
class _Submit:
    """One submit waiting for its group commit."""

    params: Submitted
    notify: bool
    row: RunRow | None = None
    error: BaseException | None = None


class Submits:
    """The insert statements (built once per store) and the group commit."""

    def __init__(
        self,
        db: Database,
        notify: Callable[[Sequence[str]], Awaitable[None]],
        fast: FastPath | None = None,
    ) -> None:
        self._db = db
        # PostgreSQL: plain submits go straight to asyncpg (fastpath.py).
        self._fast = fast
        self._notify = notify
        self._statements: dict[tuple[bool, bool], Any] = {}
        self._waiting: list[_Submit] = []
        self._flushing = False
        self._flushed: anyio.Event | None = None

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
    ) -> tuple[RunRow, bool]:
        """One statement. Returns (row, created); a repeated idempotency key
        returns the stored row.

        `notify` (PostgreSQL): the same statement NOTIFYs other processes,
        for submitters with no lifespan to coalesce notifications: one round
        trip, delivered when the insert commits."""
        params: Submitted = {
            "id": uuid.uuid4(), "task": task, "max_attempts": max_attempts,
            "max_rescues": max_rescues, "retry_delays": retry_delays,
            "timeout_seconds": timeout_seconds, "priority": priority, "args": args,
            "kwargs": kwargs, "idempotency_key": idempotency_key,
            "eta": eta.astimezone(UTC) if eta is not None else None,
        }  # fmt: skip
        if self._db.is_pg:
            params["delay"] = timedelta(seconds=countdown or 0)
        else:
            now = self._db.wall_now()
            params["now"] = now
            params["scheduled"] = params["eta"] or now + timedelta(seconds=countdown or 0)
        notify = notify and self._db.is_pg
        if idempotency_key is None:
            return await self._grouped(params, notify=notify), True
        async with self._db.one() as conn:
            row = (await conn.execute(self._insert(idempotent=True, notify=notify), params)).first()
        if row is not None:
            return run_row(row), True
        async with self._db.read() as conn:
            found = select_by_key(task, idempotency_key)
            row = (await conn.execute(found)).first()
        if row is None:  # deleted between the two statements: vanishingly rare
            raise StoreUnavailable("The run for this idempotency key changed; try again.")
        return run_row(row), False

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
    ) -> list[RunRow]:
        """Many runs of one task (a `map`), all or none: one transaction,
        one statement per MAP_CHUNK runs, the varying part (id, arguments)
        sent as a single JSON parameter so the statement never changes."""
        if not calls:
            return []
        ids = [uuid.uuid4() for _ in calls]
        common: dict[str, Any] = {
            "task": task, "max_attempts": max_attempts, "max_rescues": max_rescues,
            "retry_delays": json.dumps(retry_delays), "timeout": timeout_seconds,
        }  # fmt: skip
        statement = INSERT_MANY[self._db.dialect]
        encode = str if self._db.is_pg else (lambda i: i.hex)
        returned: dict[uuid.UUID, Any] = {}
        async with self._db.write() as conn:
            for start in range(0, len(calls), MAP_CHUNK):
                chunk = range(start, min(start + MAP_CHUNK, len(calls)))
                batch = [[encode(ids[i]), *calls[i]] for i in chunk]
                params = {**common, "batch": json.dumps(batch, separators=(",", ":"))}
                params.update(self._db.clock_params())
                returned.update((row.id, row) for row in await conn.execute(statement, params))
            if notify and self._db.is_pg:
                await conn.execute(
                    sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("task", task)))
                )
        sent: Submitted = {
            "task": task, "max_attempts": max_attempts, "max_rescues": max_rescues,
            "retry_delays": retry_delays, "timeout_seconds": timeout_seconds,
        }  # fmt: skip
        return [
            new_row({**sent, "args": args, "kwargs": kwargs}, returned[run_id])
            for run_id, (args, kwargs) in zip(ids, calls, strict=True)
        ]

    async def _grouped(self, params: Submitted, *, notify: bool) -> RunRow:
        """Group commit: submits that arrive while an insert is in flight
        go together in the next one, a single multi-row statement. A lone
        submit is one statement as before; fifty concurrent ones (a busy
        app) cost a few statements instead of fifty."""
        item = _Submit(params, notify)
        self._waiting.append(item)
        while item.row is None and item.error is None:
            if self._flushing:
                if self._flushed is None:
                    self._flushed = anyio.Event()
                try:
                    await self._flushed.wait()
                except BaseException:
                    # Cancelled before a leader took it: it must not be
                    # stored behind its caller's back by a later group.
                    if item in self._waiting:
                        self._waiting.remove(item)
                    raise
                continue
            self._flushing = True
            batch, self._waiting = self._waiting, []
            try:
                # Shielded: the batch holds other callers' runs, which must
                # be stored (or refused) whatever happens to this caller.
                with anyio.CancelScope(shield=True):
                    await self._flush(batch)
            finally:
                self._flushing = False
                flushed, self._flushed = self._flushed, None
                if flushed is not None:
                    flushed.set()
        if item.error is not None:
            raise item.error
        assert item.row is not None
        return item.row

    async def _flush(self, batch: list[_Submit]) -> None:
        if len(batch) == 1:
            await self._flush_one(batch[0])
            return
        try:
            # One statement (one transaction on SQLite, where a large group
            # goes as several INSERTs): a refusal must leave none stored
            # before the submits are retried alone.
            returned: dict[uuid.UUID, Any]
            if self._fast is not None:
                records = await self._fast.insert_many([i.params for i in batch])
                returned = {r["id"]: SimpleNamespace(**r) for r in records}
            else:
                async with self._db.write() as conn:
                    insert = self._insert(idempotent=False, notify=False)
                    result = await conn.execute(insert, [i.params for i in batch])
                    returned = {row.id: row for row in result}
            stored = {i.params["id"]: new_row(i.params, returned[i.params["id"]]) for i in batch}
        except InvalidValue:
            # One bad value fails the whole statement and nothing was
            # stored: each submit alone, so only the bad one is refused.
            for item in batch:
                await self._flush_one(item)
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
                await self._notify(tasks)
            except StoreUnavailable:
                pass  # the runs are committed; feeds find them at their next poll

    async def _flush_one(self, item: _Submit) -> None:
        try:
            if self._fast is not None:
                channel = NOTIFY_CHANNEL if item.notify else None
                record = await self._fast.insert_one(item.params, notify=channel)
                item.row = new_row(item.params, SimpleNamespace(**record))
                return
            insert = self._insert(idempotent=False, notify=item.notify)
            async with self._db.one() as conn:
                row = (await conn.execute(insert, item.params)).one()
            item.row = new_row(item.params, row)
        except Exception as exc:
            item.error = exc

    def _insert(self, *, idempotent: bool, notify: bool) -> Any:
        """Built once per store: a submit only binds parameters (the hot path)."""
        statement = self._statements.get((idempotent, notify))
        if statement is None:
            statement = self._statements[idempotent, notify] = self._build_insert(
                idempotent=idempotent, notify=notify
            )
        return statement

    def _build_insert(self, *, idempotent: bool, notify: bool) -> Any:
        if self._db.is_pg:
            scheduled: Any = sa.func.coalesce(
                sa.bindparam("eta", type_=sa.DateTime(timezone=True)),
                sa.func.now() + sa.bindparam("delay", type_=sa.Interval),
            )
        else:
            scheduled = sa.bindparam("scheduled", type_=sa.DateTime(timezone=True))
        now = self._db.now_param()
        columns = (
            "id", "task", "max_attempts", "max_rescues", "retry_delays", "timeout_seconds",
            "priority", "args", "kwargs", "idempotency_key",
        )  # fmt: skip
        values: dict[str, Any] = {c: sa.bindparam(c, type_=runs.c[c].type) for c in columns}
        values.update(
            state=RunState.SCHEDULED.value, attempt=0, rescues=0, cancel_requested=False,
            created_at=now, updated_at=now, scheduled_at=scheduled,
        )  # fmt: skip
        insert = (postgresql.insert if self._db.is_pg else sqlite.insert)(runs).values(values)
        if idempotent:
            insert = insert.on_conflict_do_nothing(
                index_elements=[runs.c.task, runs.c.idempotency_key],
                index_where=runs.c.idempotency_key.isnot(None),
            )
        # A new run is what the submit sent plus three values the database
        # sets: returning only those spares decoding 25 columns per submit.
        returned = (runs.c.id, runs.c.task, runs.c.created_at, runs.c.scheduled_at)
        statement: Any = insert.returning(*(runs.c if idempotent else returned))
        if notify:
            inserted = statement.cte("inserted")
            notified = sa.func.pg_notify(NOTIFY_CHANNEL, inserted.c.task).label("notified")
            statement = sa.select(*inserted.c, notified)
        return statement


def select_by_key(task: str, idempotency_key: str) -> sa.Select[Any]:
    return sa.select(runs).where(runs.c.task == task, runs.c.idempotency_key == idempotency_key)
