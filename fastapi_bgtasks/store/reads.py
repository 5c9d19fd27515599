"""⑥ Status reads (one run, many runs at once for the event streams' shared
reader, the list, the history), and the feed's two reads: the runs a worker
already holds (re-sent when its stream reconnects) and what is waiting for
it (a run already due, and when the next one falls due). Nothing here writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..states import RunState
from .dialect import Database
from .rows import DeliveryRow, HistoryRow, RunRow, delivery_row, history_row, run_row, utc
from .schema import SCHEDULED, history, runs

__all__ = ["DELIVERY", "Reads"]

# What a worker is sent of a claimed run.
DELIVERY = (
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


# The columns `GET /runs` leaves out unless asked for, by the name it asks with.
_VALUES = {"args": ("args", "kwargs"), "result": ("result",)}
_ALL_VALUES = frozenset({"args", "kwargs", "result"})
_ROW_OVERHEAD = 512  # bytes of a listed run beyond its JSON values, about


def _newest_first(
    query: Any,
    state: RunState | None,
    task: str | None,
    cursor: tuple[datetime, uuid.UUID] | None,
) -> Any:
    """The run list's filters and order: newest first, after the cursor."""
    query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc())
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
    return query


class Reads:
    def __init__(self, db: Database) -> None:
        self._db = db
        # From now on, by the index of waiting runs by due time: a backlog
        # of due runs costs nothing.
        self._next_due = (
            sa.select(runs.c.scheduled_at)
            .where(
                SCHEDULED,
                runs.c.scheduled_at > db.now_param(),
                runs.c.task.in_(sa.bindparam("tasks", expanding=True)),
            )
            .order_by(runs.c.scheduled_at)
            .limit(1)
        )
        # The feed's question after each claim, in one round trip: is a run
        # due that the claim could not take (no credit, or locked by a
        # concurrent claim), and when does the next one fall due?
        due_now = sa.exists().where(
            SCHEDULED,
            runs.c.scheduled_at <= db.now_param(),
            runs.c.task.in_(sa.bindparam("tasks", expanding=True)),
        )
        self._waiting = sa.select(due_now, self._next_due.scalar_subquery())

    async def ping(self) -> None:
        async with self._db.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def get_run(self, run_id: uuid.UUID) -> RunRow | None:
        async with self._db.read() as conn:
            row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).first()
        return run_row(row) if row is not None else None

    async def get_runs(self, run_ids: Sequence[uuid.UUID]) -> list[RunRow]:
        """These runs, in one statement (unknown ids are left out)."""
        if not run_ids:
            return []
        query = sa.select(runs).where(runs.c.id.in_(list(run_ids)))
        async with self._db.read() as conn:
            return [run_row(r) for r in await conn.execute(query)]

    async def list_runs(
        self,
        *,
        state: RunState | None,
        task: str | None,
        limit: int,
        cursor: tuple[datetime, uuid.UUID] | None,
    ) -> list[RunRow]:
        query = _newest_first(sa.select(runs), state, task, cursor).limit(limit)
        async with self._db.read() as conn:
            return [run_row(r) for r in await conn.execute(query)]

    async def page_runs(
        self,
        *,
        state: RunState | None,
        task: str | None,
        limit: int,
        cursor: tuple[datetime, uuid.UUID] | None,
        include: Collection[str],
        max_bytes: int,
    ) -> tuple[list[RunRow], bool]:
        """One page of `GET /runs`: at most `limit` runs and, past the first,
        no more than `max_bytes` of stored JSON (the arguments and the result
        only when named in `include`, as "args" and "result"). Returns the
        runs and whether more follow. The sizes are read first, so a page
        never loads more than it sends."""
        values = {c for name in ("args", "result") if name in include for c in _VALUES[name]}
        size = sum(
            (sa.func.coalesce(self._octets(runs.c[c]), 0) for c in sorted(values | {"error"})),
            sa.literal(_ROW_OVERHEAD),
        )
        sized = _newest_first(sa.select(runs.c.id, size.label("size")), state, task, cursor)
        async with self._db.read() as conn:
            found = list(await conn.execute(sized.limit(limit + 1)))
            chosen: list[uuid.UUID] = []
            total = 0
            for row in found[:limit]:
                if chosen and total + row.size > max_bytes:
                    break
                chosen.append(row.id)
                total += row.size
            if not chosen:
                return [], False
            columns = [
                sa.null().label(c.name) if c.name in _ALL_VALUES - values else c for c in runs.c
            ]
            query = _newest_first(sa.select(*columns), None, None, None)
            rows = [run_row(r) for r in await conn.execute(query.where(runs.c.id.in_(chosen)))]
        return rows, len(found) > len(chosen)

    def _octets(self, column: Any) -> Any:
        """A JSON column's size in bytes as stored."""
        if self._db.is_pg:
            return sa.func.octet_length(sa.cast(column, sa.Text))
        return sa.func.length(sa.cast(column, sa.LargeBinary))

    async def run_history(self, run_id: uuid.UUID) -> list[HistoryRow]:
        query = sa.select(history).where(history.c.run_id == run_id).order_by(history.c.id)
        async with self._db.read() as conn:
            return [history_row(r) for r in await conn.execute(query)]

    async def leased_to(self, worker_id: str, tasks: Sequence[str]) -> list[DeliveryRow]:
        """Runs still PENDING under this worker: re-sent when its feed reconnects."""
        query = (
            sa.select(*DELIVERY)
            .where(
                runs.c.worker_id == worker_id,
                runs.c.state == RunState.PENDING.value,
                runs.c.task.in_(list(tasks)),
            )
            .order_by(runs.c.priority.desc(), runs.c.scheduled_at)
        )
        async with self._db.read() as conn:
            return [delivery_row(r) for r in await conn.execute(query)]

    async def waiting(self, tasks: Sequence[str]) -> tuple[bool, datetime | None]:
        """(a run of these tasks is due and still waiting, when the earliest
        one not yet due becomes due)."""
        params: dict[str, Any] = {"tasks": list(tasks), **self._db.clock_params()}
        async with self._db.read() as conn:
            row = (await conn.execute(self._waiting, params)).one()
        value = row[1]
        if isinstance(value, str):  # defensive: SQLite text timestamps
            value = datetime.fromisoformat(value)
        return bool(row[0]), utc(value)

    async def next_due(self, tasks: Sequence[str]) -> datetime | None:
        """When the earliest run of these tasks not yet due becomes due (runs
        already due are the claim's business)."""
        params: dict[str, Any] = {"tasks": list(tasks), **self._db.clock_params()}
        async with self._db.read() as conn:
            value = await conn.scalar(self._next_due, params)
        if isinstance(value, str):  # defensive: SQLite text timestamps
            value = datetime.fromisoformat(value)
        return utc(value)

    async def overdue(self, tasks: Sequence[str], seconds: float) -> list[str]:
        """Those of `tasks` with a run that has been due for over `seconds`
        and still waits (each an index probe of the task's waiting runs)."""
        found: list[str] = []
        cutoff = self._db.after(-seconds)
        async with self._db.read() as conn:
            for task in tasks:
                probe = (
                    sa.select(runs.c.id)
                    .where(SCHEDULED, runs.c.task == task, runs.c.scheduled_at < cutoff)
                    .limit(1)
                )
                if await conn.scalar(probe) is not None:
                    found.append(task)
        return found
