"""One run in a worker, from a free slot to its final report: the capacity
limiter, the start the app must confirm (unless the delivery is fresh), the
deadline, the call (async on the loop, fenced step by step; sync in a child
process the worker can stop, or a thread of its own), and the one place where
why the run ended decides what is reported.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ..errors import NotSerializable
from ..states import Outcome, ReportKind, StopReason
from ..wire import Delivery, ErrorInfo, Report, clean_text, stored_size
from .acceptance import error_message, load_call
from .config import FeedTerms
from .context import _current
from .held import HeldRun, Phase, Roster
from .leases import fence_steps
from .reporter import ReportQueue

if TYPE_CHECKING:
    from ..tasks import Task
    from .isolation import ChildPool

__all__ = ["Executor", "Verdict", "judge_result", "make_report"]

log = logging.getLogger("fastapi_bgtasks.worker")

MAX_TRACEBACK = 64 * 1024


@dataclass(frozen=True)
class Verdict:
    """What the task itself came to, before any stop request is weighed."""

    kind: ReportKind
    result: Any = None
    error: ErrorInfo | None = None


def make_report(
    d: Delivery, kind: ReportKind, *, result: Any = None, error: ErrorInfo | None = None
) -> Report:
    """A report on `d` under the lease it holds now."""
    return Report(
        run_id=d.id, lease_token=d.lease_token, state=kind.value, result=result, error=error
    )


class Executor:
    """Runs held runs, at most `concurrency` at once."""

    def __init__(
        self,
        tasks: dict[str, Task[Any, Any]],
        roster: Roster,
        queue: ReportQueue,
        terms: Callable[[], FeedTerms],
        concurrency: int,
        children: ChildPool | None = None,
    ) -> None:
        self.tasks = tasks
        self.roster = roster
        self.queue = queue
        self._terms = terms
        self.limiter = anyio.CapacityLimiter(concurrency)
        # Sync runs execute in these child processes (None: in threads).
        self.children = children

    async def execute(self, held: HeldRun, runs: TaskGroup) -> None:
        """Run `held` to its final report; `runs` hosts its deadline."""
        d = held.delivery
        acquired = False
        with held.wait_scope:
            await self.limiter.acquire()
            acquired = True
        if not acquired:  # stopped while waiting for a slot
            self._conclude(held, None, ran=False)
            return
        try:
            held.phase = Phase.STARTED
            if held.fresh and held.stop_reason is None:
                # Reported in the next batch; a refusal stops the run.
                self.queue.enqueue(make_report(d, ReportKind.RUNNING), held.running_answered)
            elif not await self._confirm_start(held):
                self._conclude(held, None, ran=False)
                return
            log.info("Received task run: %s - %s", d.id, d.task)
            verdict = await self._call(held, runs)
        finally:
            self.limiter.release()
        self._conclude(held, verdict, ran=True)

    async def _confirm_start(self, held: HeldRun) -> bool:
        """Report RUNNING and wait for the app to accept it before calling the
        task: a delivery that may have sat in a half-open link while its lease
        expired is refused here, so it never runs beside its successor."""
        confirmed = anyio.Event()
        answer: list[Outcome] = []

        def answered(outcome: Outcome) -> None:
            answer.append(outcome)
            confirmed.set()
            held.running_answered(outcome)

        self.queue.enqueue(make_report(held.delivery, ReportKind.RUNNING), answered, urgent=True)
        with anyio.CancelScope() as scope:
            held.scope = scope
            if held.stop_reason is not None:
                scope.cancel()
            await confirmed.wait()
        held.scope = None
        if answer and answer[0] in (Outcome.STALE, Outcome.UNKNOWN):
            log.warning(
                "Run %s: the app refused its start (%s); not running it",
                held.delivery.id,
                answer[0],
            )
            held.stop_reason = StopReason.LOST  # whatever else was asked: it is not ours
            return False
        return bool(answer) and held.stop_reason is None

    def _conclude(self, held: HeldRun, verdict: Verdict | None, *, ran: bool) -> None:
        """The one place a run's end becomes its final report. A stop request
        outweighs what the task returned; a lost lease reports nothing (the
        run is another's now)."""
        d = held.delivery  # its lease now: it may have moved to a new one of ours
        reason = held.stop_reason
        if reason is StopReason.LOST:
            if ran:
                log.warning("Task run %s - %s: lease lost; result dropped", d.id, d.task)
            self.roster.abandon(held)
            return
        if reason is StopReason.CANCEL:
            report = make_report(d, ReportKind.CANCELLED)
        elif reason is StopReason.TIMEOUT:
            error = ErrorInfo(
                type="TimeoutError",
                message=f"The run took longer than its timeout of {d.timeout_seconds:g}s.",
            )
            report = make_report(d, ReportKind.FAILED, error=error)
        elif reason is StopReason.SHUTDOWN or verdict is None:
            report = make_report(d, ReportKind.RELEASED)  # handed back, no attempt spent
        else:
            report = make_report(d, verdict.kind, result=verdict.result, error=verdict.error)
        if ran:
            log.info("Task run %s - %s: Finished in state %s", d.id, d.task, _state_label(report))
        self.roster.finish(held)

        def settled(_outcome: Outcome) -> None:
            # Keep renewing the lease until the final report has landed.
            self.roster.release(held)

        # Sent without the batching window: the app frees this worker's
        # credit (and leases it the next run) only once it lands. Under load
        # reports still share requests: they queue while one is in flight.
        self.queue.enqueue(report, settled, urgent=True)

    async def _call(self, held: HeldRun, runs: TaskGroup) -> Verdict | None:
        """Call the task; None when it was stopped (its stop reason decides)."""
        d = held.delivery
        task = self.tasks.get(d.task)
        # Loaded as it arrived (acceptance.py); a run it could not accept is
        # only held when the app takes no REJECTED report: it fails.
        call = held.call or load_call(task, d)
        if task is None or isinstance(call, ErrorInfo):
            return Verdict(ReportKind.FAILED, error=call if isinstance(call, ErrorInfo) else None)
        args, kwargs = call
        children = self.children if not task.is_async else None
        isolated = children is not None and children.serves(task.name)
        token = _current.set(held.context)
        if d.timeout_seconds:
            runs.start_soon(self._deadline, held, d.timeout_seconds)
        value: Any = None
        verdict: Verdict | None = None
        try:
            with anyio.CancelScope() as scope:
                held.scope = scope if task.is_async or isolated else None
                if held.stop_reason is not None:
                    scope.cancel()
                if task.is_async:
                    value = await fence_steps(task.fn(*args, **kwargs), held, self._terms)
                elif children is not None and isolated:
                    # Stoppable: a stop request cancels this scope, and the
                    # child process is killed (DESIGN §4, sync tasks).
                    reply = await children.call(held, self._terms)
                    verdict = Verdict(*reply) if reply is not None else None
                else:
                    # A thread cannot be interrupted: it keeps its slot and
                    # lease until it returns.
                    value = await _in_daemon_thread(lambda: task.fn(*args, **kwargs), d)
        except Exception as exc:
            if held.stop_reason is None:
                return Verdict(ReportKind.FAILED, error=_error_info(exc))
        finally:
            _current.reset(token)
            held.scope = None
            held.deadline_scope.cancel()
        if held.stop_reason is not None:
            return None
        if isolated:
            return verdict
        return judge_result(task, value, self._terms().max_result_bytes)

    async def _deadline(self, held: HeldRun, seconds: float) -> None:
        with held.deadline_scope:
            await anyio.sleep(seconds)
            held.stop(StopReason.TIMEOUT)


def judge_result(task: Task[Any, Any], value: Any, limit: int) -> Verdict:
    """What a sync or async task's return value comes to, as JSON within `limit`."""
    try:
        result = task.dump_result(value)
    except NotSerializable as exc:
        error = ErrorInfo(type="NotSerializable", message=str(exc))
        return Verdict(ReportKind.FAILED, error=error)
    # Measured as the app stores it (UTF-8 bytes of compact JSON), so
    # the worker and the app refuse the same results.
    size = stored_size(result)
    if size is None:
        message = f"Task {task.name!r} returned a value JSON cannot carry."
        return Verdict(ReportKind.FAILED, error=ErrorInfo(type="NotSerializable", message=message))
    if size > limit:
        message = f"The result is {size} bytes as stored JSON (UTF-8); the limit is {limit}."
        return Verdict(ReportKind.FAILED, error=ErrorInfo(type="ResultTooLarge", message=message))
    return Verdict(ReportKind.COMPLETED, result=result)


async def _in_daemon_thread(call: Callable[[], Any], d: Delivery) -> Any:
    """Run a sync task in a daemon thread of its own.

    Waiting can be abandoned (shutdown past the grace period) without
    holding the process: the thread is a daemon. Context variables
    (`current_run()`) follow the call into the thread.
    """
    done = anyio.Event()
    box: dict[str, Any] = {}
    token = anyio.lowlevel.current_token()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = context.run(call)
        except BaseException as exc:  # handed to the awaiting task, not swallowed
            box["error"] = exc
        finally:
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except RuntimeError:
                pass  # the loop is gone: nobody waits any more

    threading.Thread(target=target, name=f"run {d.id}", daemon=True).start()
    await done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _error_info(exc: BaseException) -> ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK:
        text = text[-MAX_TRACEBACK:]
    return ErrorInfo(
        type=type(exc).__name__[:200],
        message=clean_text(error_message(exc)[:10000]),
        traceback=clean_text(text),
    )


def _state_label(report: Report) -> str:
    if report.state == ReportKind.COMPLETED:
        return "Completed()"
    if report.state == ReportKind.FAILED:
        error = report.error
        return f"Failed('{error.type}: {error.message}')" if error else "Failed()"
    if report.state == ReportKind.CANCELLED:
        return "Cancelled()"
    return "HandedBack()"
