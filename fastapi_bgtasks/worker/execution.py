"""One run in a worker, from a free slot to its final report: the slots (a
runner task each, over a local backlog), the start the app must confirm
(unless the delivery is fresh), the deadline, the call (async on the loop,
fenced step by step; sync in a child process the worker can stop, or a
thread of its own), and the one place where why the run ended decides what
is reported.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import traceback
from collections import deque
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
# Runs a runner takes from the backlog in a row before it lets the loop
# have a turn (short runs that never await would hold it otherwise).
_STREAK = 32


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
    """Runs held runs, at most `concurrency` at once: one long-lived runner
    task per slot takes runs from a local backlog, oldest first, so a run
    costs no task, limiter or cancel scope of its own. A runner's scope is
    the running run's: a stop cancels it, and the runner opens a new one."""

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
        self.concurrency = concurrency
        # Sync runs execute in these child processes (None: in threads).
        self.children = children
        self._backlog: deque[HeldRun] = deque()
        self._idle: deque[anyio.Event] = deque()  # one per runner waiting for a run
        self._runners = 0

    def submit(self, held: HeldRun, runs: TaskGroup) -> None:
        """Queue `held` for the next free slot; a slot's runner starts in
        `runs` while fewer than `concurrency` are alive."""
        held.on_stop_waiting = self._stopped_waiting
        self._backlog.append(held)
        if self._wake_one():
            return
        if self._runners < self.concurrency:
            self._runners += 1
            runs.start_soon(self._runner, name=f"slot {self._runners}")

    def _wake_one(self) -> bool:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.is_set():
                waiter.set()
                return True
        return False

    def _stopped_waiting(self, held: HeldRun) -> None:
        """Stopped before a slot took it: its report now (a runner skips it)."""
        self._conclude(held, None, ran=False)

    async def _runner(self) -> None:
        try:
            while True:
                with anyio.CancelScope() as scope:
                    streak = 0
                    # A stop cancelled the scope: whatever run it was for is
                    # over, and the next run starts in a new scope.
                    while not scope.cancel_called:
                        if not self._backlog or streak >= _STREAK:
                            # Let the loop (reports, the feed) have a turn.
                            streak = 0
                            await self._next()
                        held = self._backlog.popleft()
                        if held.phase is Phase.RECEIVED:
                            streak += 1
                            await self.execute(held, scope)
        finally:
            self._runners -= 1

    async def _next(self) -> None:
        """Until the backlog holds a run (a checkpoint when it already does)."""
        if self._backlog:
            await anyio.lowlevel.checkpoint()
        while not self._backlog:
            waiter = anyio.Event()
            self._idle.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                if waiter.is_set():
                    self._wake_one()  # a wake-up this runner cannot take: pass it on
                else:
                    self._idle.remove(waiter)
                raise

    async def execute(self, held: HeldRun, scope: anyio.CancelScope) -> None:
        """Run `held` to its final report in `scope` (its runner's): a stop
        cancels the scope while the run waits for its start to be accepted,
        and while an async task (or a sync one's child process) runs."""
        d = held.delivery
        held.phase = Phase.STARTED
        ran = False
        held.scope = scope
        try:
            if held.stop_reason is not None:
                pass
            elif held.fresh:
                # Reported in the next batch; a refusal stops the run.
                self.queue.enqueue(make_report(d, ReportKind.RUNNING), held.running_answered)
                ran = True
            else:
                ran = await self._confirm_start(held)
            verdict = await self._call(held) if ran else None
        except anyio.get_cancelled_exc_class():
            # A stop (or shutdown) ended the run. Only when the run cannot
            # still be going: a sync run in a thread is left to its lease.
            stoppable = held.scope is not None
            held.scope = None
            if stoppable and held.stop_reason is not None:
                self._conclude(held, None, ran=ran)
            raise
        held.scope = None
        self._conclude(held, verdict, ran=ran)

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
        await confirmed.wait()
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
        if ran and log.isEnabledFor(logging.INFO):
            log.info("Task run %s - %s: Finished in state %s", d.id, d.task, _state_label(report))
        self.roster.finish(held)

        def settled(_outcome: Outcome) -> None:
            # Keep renewing the lease until the final report has landed.
            self.roster.release(held)

        # Prompt, not windowed: the app frees this worker's credit (and
        # leases it the next run) only once it lands. Final reports of runs
        # ending in the same turns of the loop share a request, and they
        # queue while one is in flight.
        self.queue.enqueue(report, settled, urgent=True)

    async def _call(self, held: HeldRun) -> Verdict | None:
        """Call the task; None when it was stopped (its stop reason decides).
        A stop cancels the runner's scope (`held.scope`) while an async task
        or a child process runs; a thread cannot be stopped, so its run
        clears `held.scope` and keeps its slot and lease until it returns."""
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
        if not (task.is_async or isolated):
            held.scope = None
        token = _current.set(held.context)
        # The deadline: a timer only for runs that have one.
        timer = (
            asyncio.get_running_loop().call_later(d.timeout_seconds, held.stop, StopReason.TIMEOUT)
            if d.timeout_seconds
            else None
        )
        value: Any = None
        verdict: Verdict | None = None
        try:
            if task.is_async:
                value = await fence_steps(task.fn(*args, **kwargs), held, self._terms)
            elif children is not None and isolated:
                # Stoppable: a stop request cancels the scope, and the
                # child process is killed (DESIGN §4, sync tasks).
                reply = await children.call(held, self._terms)
                verdict = Verdict(*reply) if reply is not None else None
            else:
                value = await _in_daemon_thread(lambda: task.fn(*args, **kwargs), d)
        except Exception as exc:
            if held.stop_reason is None:
                return Verdict(ReportKind.FAILED, error=_error_info(exc))
        finally:
            _current.reset(token)
            if timer is not None:
                timer.cancel()
        if held.stop_reason is not None:
            return None
        if isolated:
            return verdict
        return judge_result(task, value, self._terms().max_result_bytes)


def judge_result(task: Task[Any, Any], value: Any, limit: int) -> Verdict:
    """What a sync or async task's return value comes to, as JSON within `limit`."""
    try:
        result = task.dump_result(value)
    except NotSerializable as exc:
        error = ErrorInfo(type="NotSerializable", message=str(exc))
        return Verdict(ReportKind.FAILED, error=error)
    # Measured as the app stores it (UTF-8 bytes of compact JSON), so
    # the worker and the app refuse the same results.
    size = 4 if result is None else stored_size(result)  # null
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
