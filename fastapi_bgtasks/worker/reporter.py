"""A worker's reports on their way to the app: queued as each run moves,
sent oldest first in batches (a burst of finishing runs shares one request),
halved when something in between refuses the size, retried with back-off.
Each report is serialised once, when first measured for a batch: the batch
budget measures those bytes and the request body is made of them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from ..backoff import Backoff
from ..errors import AccessDenied, BgTasksError, RemoteError
from ..states import Outcome, ReportKind
from ..wire import ErrorInfo, Report, ReportState
from .config import FeedTerms

__all__ = ["MAX_BATCH", "QueuedReport", "ReportQueue", "Reporter"]

log = logging.getLogger("fastapi_bgtasks.worker")

MAX_BATCH = 200
# Room in a body for the envelope around the reports.
_ENVELOPE = 200


@dataclass(eq=False)
class QueuedReport:
    report: Report
    on_outcome: Callable[[Outcome], None] | None
    # Already a replacement for a report the app refused: never replaced twice.
    replaced: bool = False
    _encoded: bytes | None = field(default=None, init=False, repr=False)

    @property
    def encoded(self) -> bytes:
        """The report as sent, serialised once, when it is first measured
        for a batch (a RUNNING report dropped before that never is)."""
        if self._encoded is None:
            self._encoded = self.report.model_dump_json().encode()
        return self._encoded


class ReportQueue:
    """The reports not yet answered, oldest first. No I/O: `take_batch`
    marks the oldest as in flight, and `settle` (the app answered) or
    `unsend` (it did not) ends the flight. Reports in flight are removed by
    position, so nothing before them ever moves."""

    def __init__(self) -> None:
        self._queued: list[QueuedReport] = []
        # The RUNNING reports not yet in flight, by run: a final report
        # finds the one it makes redundant without a scan.
        self._unsent_running: dict[uuid.UUID, QueuedReport] = {}
        self._in_flight = 0
        self.batch_cap = MAX_BATCH
        self.has_reports = anyio.Event()
        self.urgent = anyio.Event()

    @property
    def queued(self) -> tuple[QueuedReport, ...]:
        """A read-only view of the queue, oldest first (those in flight too)."""
        return tuple(self._queued)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enqueue(
        self,
        report: Report,
        on_outcome: Callable[[Outcome], None] | None = None,
        *,
        urgent: bool = False,
    ) -> None:
        """Queue a report; `urgent` when a run waits for its answer (a start
        to confirm, a slot to free): the reporter skips its batching window."""
        if report.state == ReportKind.COMPLETED and self._unsent_running:
            self._drop_unsent_running(report)
        queued = QueuedReport(report, on_outcome)
        if report.state == ReportKind.RUNNING:
            self._unsent_running[report.run_id] = queued
        self._queued.append(queued)
        if not self.has_reports.is_set():
            self.has_reports.set()
        if urgent and not self.urgent.is_set():
            self.urgent.set()

    def _drop_unsent_running(self, final: Report) -> None:
        """A short run finished before its RUNNING report left: send only the
        COMPLETED one. The app records the run as RUNNING on the way (its
        history shows PENDING → RUNNING → COMPLETED), and the batch costs one
        statement instead of two."""
        queued = self._unsent_running.get(final.run_id)
        if queued is not None and queued.report.lease_token == final.lease_token:
            del self._unsent_running[final.run_id]
            self._queued.remove(queued)  # by identity: not in flight, so after them

    def take_batch(self, max_body_bytes: int) -> list[QueuedReport]:
        """The oldest reports that fit in one request body, now in flight."""
        budget = int(max_body_bytes * 0.9) - _ENVELOPE
        batch: list[QueuedReport] = []
        used = 0
        for queued in self._queued[: min(MAX_BATCH, self.batch_cap)]:
            size = len(queued.encoded) + 1  # the very bytes sent, and a comma
            if batch and used + size > budget:
                break
            batch.append(queued)
            used += size
            if self._unsent_running.get(queued.report.run_id) is queued:
                del self._unsent_running[queued.report.run_id]
        self._in_flight = len(batch)
        return batch

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """The app answered the reports in flight: drop them and hand each
        its outcome."""
        batch = self._queued[: self._in_flight]
        del self._queued[: self._in_flight]
        self._in_flight = 0
        self.batch_cap = min(MAX_BATCH, self.batch_cap * 2)
        for queued, outcome in zip(batch, outcomes, strict=False):
            if outcome == Outcome.STALE and queued.report.state != ReportKind.RUNNING:
                log.warning(
                    "Run %s: report refused as stale (the lease moved on); dropped",
                    queued.report.run_id,
                )
            if queued.on_outcome is not None:
                queued.on_outcome(outcome)

    def unsend(self) -> None:
        """The reports in flight did not land: they stay queued, first."""
        self._in_flight = 0

    def refused_too_large(self, sent: int, error: BgTasksError) -> None:
        """The app (or a proxy) refused `sent` reports as too large or invalid:
        send fewer; a single one is replaced by a FAILED report saying why,
        and dropped if that is refused too."""
        self._in_flight = 0
        if sent > 1:
            self.batch_cap = max(1, sent // 2)
            return
        first = self._queued[0]
        if not first.replaced:
            self._queued[0] = QueuedReport(_refused(first.report, error), first.on_outcome, True)
            return
        log.error("Run %s: report refused again (%s); dropped", first.report.run_id, error)
        del self._queued[0]
        if first.on_outcome is not None:
            first.on_outcome(Outcome.STALE)


class Reporter:
    """Sends the queue through `send` (the API client's `reports`)."""

    def __init__(
        self,
        send: Callable[[list[bytes]], Awaitable[list[Outcome]]],
        terms: Callable[[], FeedTerms],
    ) -> None:
        self.queue = ReportQueue()
        self._send = send
        self._terms = terms
        self._flush_lock = anyio.Lock()

    async def run(self) -> None:
        """Send reports as they come, until cancelled."""
        refused = Backoff(0.2, 10.0)
        queue = self.queue
        while True:
            await queue.has_reports.wait()
            # A short window lets one POST carry many reports, cut short
            # when a run waits to start.
            if not queue.urgent.is_set():
                with anyio.move_on_after(self._terms().report_interval):
                    await queue.urgent.wait()
            # Let runs that are ready to finish in this turn of the loop (a
            # batch of short tasks) queue their reports first: one request
            # and one statement for them all, not 1 then 19.
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            queue.urgent = anyio.Event()
            if await self.flush():
                refused.reset()
            else:  # refused credentials: do not hammer (or lock out) the app
                await refused.sleep()

    async def flush_all(self) -> None:
        """Send everything queued (at shutdown)."""
        while self.queue.queued:
            if not await self.flush():
                await anyio.sleep(0.2)

    async def flush(self) -> bool:
        """Send what is queued, oldest first; on failure keep it queued.
        False when the app refused this worker's credentials. One flush at a
        time (the reporter's and the final one at shutdown)."""
        async with self._flush_lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        queue = self.queue
        backoff = Backoff(0.1, 5.0)
        while queue.queued:
            batch = queue.take_batch(self._terms().max_body_bytes)
            try:
                outcomes = await self._send([q.encoded for q in batch])
            except AccessDenied as exc:
                queue.unsend()
                log.error("Reports refused: %s", exc)
                return False
            except BgTasksError as exc:
                if _status(exc) in (413, 422):
                    # Something between us and the app allows less.
                    queue.refused_too_large(len(batch), exc)
                    continue
                queue.unsend()
                delay = backoff.next_delay()
                log.warning(
                    "Reports not delivered (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                continue
            except BaseException:
                queue.unsend()
                raise
            queue.settle(outcomes)
        queue.has_reports = anyio.Event()
        return True


def _status(error: BgTasksError) -> int:
    """The HTTP status an error was decoded from."""
    return error.remote_status if isinstance(error, RemoteError) else error.status_code


def _refused(report: Report, error: BgTasksError) -> Report:
    """What to report instead of a report the app refused as too large or invalid."""
    status = _status(error)
    info = ErrorInfo(
        type="ResultTooLarge" if status == 413 else "ReportRefused",
        message=f"The app refused this run's report ({status}): {error.message}"[:2000],
    )
    state: ReportState = (
        "FAILED" if report.state in (ReportKind.COMPLETED, ReportKind.FAILED) else report.state
    )
    return Report(run_id=report.run_id, lease_token=report.lease_token, state=state, error=info)
