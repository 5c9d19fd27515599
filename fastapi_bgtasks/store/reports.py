"""⑤ Reports: a worker's batch of what happened to its runs, applied as
compare-and-set statements under each run's lease token. The common kinds
(RUNNING, and COMPLETED with a result that fits) go one statement per kind
however many there are; the rest one by one. A report that changes nothing
is classified from states.repeats_of: a repeat, a lost lease, or no run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, TypedDict

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..states import (
    MAX_REJECTIONS,
    Event,
    Outcome,
    ReportKind,
    RunState,
    repeats_of,
    sources_of,
)
from ..wire import Report, clean_text, redact_inputs, stored_json, stored_size
from .dialect import Database
from .schema import history, moves, runs
from .sql import REPORT_COMPLETED, REPORT_RUNNING

__all__ = ["Applied", "Reports"]

S = RunState
_BULK = {ReportKind.RUNNING: REPORT_RUNNING, ReportKind.COMPLETED: REPORT_COMPLETED}


class Applied(TypedDict):
    """The run an accepted report moved, and where to."""

    id: uuid.UUID
    state: str


def _refusal(kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "traceback": None}


class Reports:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Bound as a parameter of the bulk statements: their text stays fixed.
        self._sources = {kind: sorted(sources_of(Event(kind.value))) for kind in _BULK}

    async def apply_reports(
        self, reports: Sequence[Report], *, max_result_bytes: int
    ) -> list[tuple[Outcome, Applied | None]]:
        """Apply a worker's batch; one outcome per report. Kinds go in
        lifecycle order (RUNNING first), so a run's RUNNING and COMPLETED
        in one batch both land."""
        outcomes: list[tuple[Outcome, Applied | None]] = [(Outcome.UNKNOWN, None)] * len(reports)
        bulk, texts, rest = self._sort(reports, max_result_bytes)
        # The bulk statements need no transaction: each report stands alone,
        # and each statement commits (and releases the rows it locked, in id
        # order) before the next; a worker resends a batch whose answer it
        # did not get, and repeats come back `duplicate`. Reports applied
        # one by one go in one transaction that locks the batch first.
        async with self._db.write() if rest else self._db.one() as conn:
            if self._db.is_pg and rest:
                # Kinds are applied one after the other, each locking its
                # rows: lock the whole batch first, in id order.
                await conn.execute(
                    sa.select(runs.c.id)
                    .where(runs.c.id.in_(sorted({r.run_id for r in reports})))
                    .order_by(runs.c.id)
                    .with_for_update()
                )
            for kind, group in bulk.items():
                if not group:
                    continue
                accepted = await self._apply_bulk(
                    conn, kind, [reports[i] for i in group], [texts.get(i) for i in group]
                )
                for i in group:
                    report = reports[i]
                    if report.run_id in accepted:
                        outcomes[i] = (Outcome.ACCEPTED, {"id": report.run_id, "state": kind})
                    else:
                        outcomes[i] = (await _classify(conn, report, report.result), None)
            for i in rest:
                outcomes[i] = await self._apply(conn, reports[i], max_result_bytes)
        return outcomes

    @staticmethod
    def _sort(
        reports: Sequence[Report], max_result_bytes: int
    ) -> tuple[dict[ReportKind, list[int]], dict[int, str | None], list[int]]:
        """Which reports go in bulk (by kind), their results as stored text,
        and the rest. Rows are taken in id order, as heartbeats lock them, so
        a batch and a heartbeat of one worker never deadlock."""
        bulk: dict[ReportKind, list[int]] = {kind: [] for kind in _BULK}
        texts: dict[int, str | None] = {}
        seen: set[tuple[str, uuid.UUID]] = set()
        rest: list[int] = []
        for i in sorted(range(len(reports)), key=lambda i: reports[i].run_id):
            report = reports[i]
            key = (report.state, report.run_id)
            if report.state not in _BULK or key in seen:
                rest.append(i)
                continue
            kind = ReportKind(report.state)
            if kind is ReportKind.COMPLETED:
                text = stored_json(report.result)
                if text is None or len(text.encode()) > max_result_bytes:
                    rest.append(i)  # refused one by one, with the reason stored
                    continue
                texts[i] = None if text == "null" else text  # SQL NULL, as one by one
            seen.add(key)
            bulk[kind].append(i)
        return bulk, texts, rest

    async def _apply_bulk(
        self,
        conn: AsyncConnection,
        kind: ReportKind,
        reports: Sequence[Report],
        results: Sequence[str | None],
    ) -> set[uuid.UUID]:
        """Reports of one kind on distinct runs in one statement; returns the
        runs it changed (the others are classified by the caller)."""
        sources = self._sources[kind]
        if self._db.is_pg:
            params: dict[str, Any] = {
                "ids": [r.run_id for r in reports],
                "tokens": [r.lease_token for r in reports],
                "sources": sources,
            }
            if kind is ReportKind.COMPLETED:
                params["results"] = list(results)
        else:
            batch = [
                [r.run_id.hex, r.lease_token, text]
                for r, text in zip(reports, results, strict=True)
            ]
            params = {"batch": json.dumps(batch), "now": self._db.wall_now(),
                      "sources": json.dumps(sources)}  # fmt: skip
        statement = _BULK[kind][self._db.dialect]
        return {row.id for row in await conn.execute(statement, params)}

    async def _apply(
        self, conn: AsyncConnection, report: Report, max_result_bytes: int
    ) -> tuple[Outcome, Applied | None]:
        """One report, one compare-and-set statement."""
        mine = sa.and_(runs.c.id == report.run_id, runs.c.lease_token == report.lease_token)
        kind, result, error = _settle(report, max_result_bytes)
        values: dict[str, Any] | None
        if kind is ReportKind.FAILED:
            values = await self._failure(conn, mine, error)
        elif kind is ReportKind.REJECTED:
            values = await self._rejection(conn, report, mine, error)
        else:
            values = self._values(kind, result)
        if values is None:  # not this lease's (read while deciding the values)
            return await _classify(conn, report, result), None
        where = sa.and_(mine, moves(Event(kind.value)))
        row = (
            await conn.execute(
                runs.update().where(where).values(values).returning(runs.c.id, runs.c.state)
            )
        ).first()
        if row is not None:
            return Outcome.ACCEPTED, {"id": row.id, "state": row.state}
        return await _classify(conn, report, result), None

    def _values(self, kind: ReportKind, result: Any) -> dict[str, Any]:
        """What a RUNNING, COMPLETED, CANCELLED or RELEASED report sets."""
        now = self._db.now()
        if kind is ReportKind.RUNNING:
            return {"state": S.RUNNING.value, "started_at": now, "updated_at": now}
        if kind is ReportKind.COMPLETED:
            return {"state": S.COMPLETED.value, "result": result, "error": None,
                    "started_at": sa.func.coalesce(runs.c.started_at, now), "finished_at": now,
                    "lease_expires_at": None, "updated_at": now, "reason": None}  # fmt: skip
        if kind is ReportKind.CANCELLED:
            return {"state": S.CANCELLED.value, "finished_at": now, "lease_expires_at": None,
                    "updated_at": now, "reason": "cancelled"}  # fmt: skip
        never_started = runs.c.state == S.PENDING.value
        asked = runs.c.cancel_requested
        return {
            # A handed-back run that someone asked to cancel stays cancelled.
            "state": sa.case((asked, S.CANCELLED.value), else_=S.SCHEDULED.value),
            "finished_at": sa.case((asked, now), else_=None),
            "attempt": sa.case((never_started, runs.c.attempt - 1), else_=runs.c.attempt),
            "rescues": sa.case((never_started, runs.c.rescues), else_=runs.c.rescues + 1),
            "scheduled_at": now, "worker_id": None, "lease_expires_at": None,
            "updated_at": now, "reason": "handed_back",
        }  # fmt: skip

    async def _failure(
        self, conn: AsyncConnection, mine: Any, error: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """A failure is retried after its back-off while attempts are left;
        None when the run is not this lease's to fail."""
        current = (
            await conn.execute(
                sa.select(
                    runs.c.attempt, runs.c.rescues, runs.c.max_attempts,
                    runs.c.retry_delays, runs.c.cancel_requested,
                ).where(mine, moves(Event.FAILED))
            )
        ).first()  # fmt: skip
        if current is None:
            return None
        now = self._db.now()
        failures = current.attempt - current.rescues
        # A worker that does not know the task cannot do better next time.
        retryable = not (error and error.get("type") == "UnknownTask")
        if retryable and failures < current.max_attempts and not current.cancel_requested:
            delays = current.retry_delays or [0.0]
            delay = float(delays[min(failures - 1, len(delays) - 1)])
            return {"state": S.SCHEDULED.value, "error": error,
                    "scheduled_at": self._db.after(delay) if delay > 0 else now,
                    "worker_id": None, "lease_expires_at": None, "updated_at": now,
                    "reason": f"retry: {error['type'] if error else 'failed'}"[:200]}  # fmt: skip
        return {"state": S.FAILED.value, "error": error,
                "started_at": sa.func.coalesce(runs.c.started_at, now), "finished_at": now,
                "lease_expires_at": None, "updated_at": now, "reason": "failed"}  # fmt: skip

    async def _rejection(
        self, conn: AsyncConnection, report: Report, mine: Any, error: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """A run its worker cannot accept goes back to the queue without
        spending a retry, kept away from the workers that would reject it
        the same way (`rejected_by`, which the claim reads); after
        MAX_REJECTIONS it ends FAILED with the worker's error. None when not
        this lease's."""
        asked = await conn.scalar(
            sa.select(runs.c.cancel_requested).where(mine, moves(Event.REJECTED))
        )
        if asked is None:
            return None
        error = error or _refusal("IncompatibleArguments", "A worker could not accept this run.")
        reason = f"rejected: {error['type']}"[:200]
        now = self._db.now()
        # Workers with the same signature of the task (else this worker) skip it.
        rejected_by = sa.literal(report.signature) if report.signature else runs.c.worker_id
        common = {"attempt": runs.c.attempt - 1, "lease_expires_at": None, "updated_at": now,
                  "rejected_by": rejected_by}  # fmt: skip
        if asked:  # someone asked to stop it: it never starts
            return {**common, "state": S.CANCELLED.value, "finished_at": now, "reason": "cancelled"}
        earlier = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(history)
            .where(
                history.c.run_id == report.run_id,
                history.c.to_state == S.SCHEDULED.value,
                history.c.reason.like("rejected: %"),
            )
        )
        rejections = int(earlier or 0) + 1
        if rejections >= MAX_REJECTIONS:
            note = f" Rejected by workers {rejections} times; not offered again."
            error = {**error, "message": (error["message"] + note)[-20_000:]}
            return {**common, "state": S.FAILED.value, "error": error, "finished_at": now,
                    "reason": reason}  # fmt: skip
        # Offered again at once (to another worker); from the second
        # rejection on after a back-off, so workers that all refuse it do not
        # pass it around without pause.
        delay = 0.0 if rejections == 1 else min(2.0 ** (rejections - 2), 60.0)
        return {**common, "state": S.SCHEDULED.value, "error": error, "reason": reason,
                "worker_id": None,
                "scheduled_at": self._db.after(delay) if delay else now}  # fmt: skip


def _settle(report: Report, max_result_bytes: int) -> tuple[ReportKind, Any, dict[str, Any] | None]:
    """The report as it will be stored: a result JSON cannot carry, or one
    too large, turns COMPLETED into FAILED with the reason; error text is
    made valid UTF-8 whatever the worker sent."""
    kind, result = ReportKind(report.state), report.result
    error = report.error.model_dump() if report.error else None
    if error is not None:
        error = {k: clean_text(v) if isinstance(v, str) else v for k, v in error.items()}
        # A worker of an older version writes pydantic's text with the
        # arguments in it; capability readers see the message.
        error["message"] = redact_inputs(error["message"])
    if kind is not ReportKind.COMPLETED:
        return kind, result, error
    size = stored_size(result)
    if size is None:
        return (
            ReportKind.FAILED,
            None,
            _refusal(
                "NotSerializable",
                "The result holds NaN, an infinity or text that is not valid Unicode, "
                "which JSON cannot carry.",
            ),
        )
    if size > max_result_bytes:
        return (
            ReportKind.FAILED,
            None,
            _refusal(
                "ResultTooLarge",
                f"The result is larger than max_result_bytes ({max_result_bytes}).",
            ),
        )
    return kind, result, error


async def _classify(conn: AsyncConnection, report: Report, result: Any) -> Outcome:
    """Why a report changed nothing: a repeat, a lost lease, or no such run."""
    query = sa.select(runs.c.state, runs.c.lease_token, runs.c.result).where(
        runs.c.id == report.run_id
    )
    row = (await conn.execute(query)).first()
    if row is None:
        return Outcome.UNKNOWN
    if row.lease_token != report.lease_token:
        return Outcome.STALE
    kind = ReportKind(report.state)
    same_result = kind is not ReportKind.COMPLETED or row.result == result
    if row.state in repeats_of(kind) and same_result:
        return Outcome.DUPLICATE
    return Outcome.STALE
