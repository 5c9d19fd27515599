"""④ The worker runtime: one anyio task group that subscribes to the feed,
runs what it delivers (async tasks on the loop, sync tasks in threads),
renews leases and reports back in batches.

Everything runs inside `Worker.run()`'s task group; shutdown is a drain:
stop taking runs, hand back the ones not started, let running ones finish
within the grace period (still heartbeating), then hand back the rest.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import secrets
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx
from anyio.abc import TaskGroup
from pydantic import ValidationError

from ..client import HttpRoute
from ..errors import (
    AccessDenied,
    BgTasksError,
    ConfigurationError,
    NotSerializable,
    RemoteError,
)
from ..wire import Delivery, ErrorInfo, Report, ReportState
from .client import WorkerClient
from .context import RunContext, _current

if TYPE_CHECKING:
    from ..tasks import Task, TaskRegistry

__all__ = ["Worker", "WorkerConfig", "configure_logging", "run_worker"]

log = logging.getLogger("fastapi_bgtasks.worker")

MAX_TRACEBACK = 64 * 1024
MAX_BATCH = 200


@dataclass
class WorkerConfig:
    """How a worker connects and how much it takes on. CLI flags map 1:1."""

    url: str
    token: str | None = None
    concurrency: int = 10
    prefetch: int | None = None
    grace_seconds: float = 30.0
    max_result_bytes: int = 1024 * 1024
    handle_signals: bool = True
    max_reconnect_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if self.prefetch is None:
            self.prefetch = self.concurrency
        if self.prefetch < 0:
            raise ConfigurationError("prefetch must not be negative")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"--url must be the http(s) URL of the mounted task API, got {self.url!r}"
            )

    @property
    def slots(self) -> int:
        return self.concurrency + (self.prefetch or 0)


def make_worker_id() -> str:
    """host:pid:random, made once per process and kept across reconnects."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Held:
    """A run this worker holds a lease on, from delivery to its final report."""

    delivery: Delivery
    context: RunContext
    last_renewed: float
    fresh: bool = False  # provably leased moments ago: start without confirming
    started: bool = False
    finished: bool = False
    stop_reason: str | None = None  # "cancel", "timeout", "lost", "shutdown"
    scope: anyio.CancelScope | None = None
    wait_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    deadline_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    @property
    def lease(self) -> tuple[uuid.UUID, str]:
        return self.delivery.id, self.delivery.lease_token

    def stop(self, reason: str) -> None:
        """Ask the run to stop. An async task is cancelled; a sync task's
        thread cannot be, so it only sees `cancelled()` turn true and keeps
        its slot and lease until it returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.context.stop.set()
        self.wait_scope.cancel()
        if self.scope is not None:
            self.scope.cancel()


@dataclass
class _Pending:
    report: Report
    on_outcome: Callable[[str], None] | None
    replaced: bool = False
    # Serialised once: the batch budget measures these bytes and the
    # request body is made of them.
    encoded: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.encoded = self.report.model_dump_json().encode()


class Worker:
    def __init__(self, registry: TaskRegistry, task_names: list[str], config: WorkerConfig) -> None:
        missing = [n for n in task_names if n not in registry.tasks]
        if missing:
            raise ConfigurationError(
                f"No task named {', '.join(map(repr, missing))} is registered on {registry!r}."
            )
        if not task_names:
            raise ConfigurationError(f"{registry!r} has no tasks to serve.")
        self.registry = registry
        self.tasks: dict[str, Task[Any, Any]] = {n: registry.tasks[n] for n in task_names}
        self.config = config
        self.worker_id = make_worker_id()
        self.held: dict[uuid.UUID, Held] = {}
        # Timing comes from the feed's hello, never from this process's hub.
        self.lease_seconds = 30.0
        self.heartbeat_seconds = 7.5
        self.report_interval = 0.02
        self._limiter = anyio.CapacityLimiter(config.concurrency)
        self._pending: list[_Pending] = []
        self._in_flight = 0  # the first reports of _pending, being sent now
        self._flush_lock = anyio.Lock()
        self._pending_event = anyio.Event()
        self._draining = anyio.Event()
        self._feed_scope = anyio.CancelScope()
        self._connected_once = False
        self._finished = anyio.Event()  # replaced each time a run finishes
        self._hello_received = anyio.Event()
        # Upper bound of (the feed's app clock - our monotonic clock); None
        # until a hello carries the app's clock.
        self._clock_offset: float | None = None
        self._urgent = anyio.Event()
        self._batch_cap = MAX_BATCH
        self.max_body_bytes = 1024 * 1024
        self.max_result_bytes = config.max_result_bytes
        self.client: WorkerClient | None = None
        self._runs: TaskGroup
        self.fatal: BaseException | None = None

    # -- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Serve until drained (signal or `drain()`), or a fatal refusal."""
        client = WorkerClient(self.config.url, self.config.token, self.worker_id, timeout=10.0)
        self.client = client
        self.registry.worker_route = HttpRoute(
            self.config.url, self.config.token, client=client.http
        )
        import asyncio

        self.registry.worker_loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tg:
                if self.config.handle_signals:
                    tg.start_soon(self._signals)
                reporter_scope = anyio.CancelScope()
                heartbeat_scope = anyio.CancelScope()
                tg.start_soon(self._reporter, reporter_scope)
                tg.start_soon(self._heartbeats, heartbeat_scope)
                async with anyio.create_task_group() as runs:
                    self._runs = runs
                    with self._feed_scope:
                        await self._feed(runs)
                    # The feed ended: we are draining.
                    await self._drain(runs)
                # Every run has its final report queued; send them, shielded.
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(10):
                        await self._flush_all()
                heartbeat_scope.cancel()
                reporter_scope.cancel()
                tg.cancel_scope.cancel()
        finally:
            self.registry.worker_route = None
            self.registry.worker_loop = None
            with anyio.CancelScope(shield=True):
                await client.aclose()
        if self.fatal is not None:
            raise self.fatal

    def drain(self) -> None:
        """Stop taking runs; finish the running ones; hand back the rest."""
        if not self._draining.is_set():
            self._draining.set()
            self._feed_scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                if not self._draining.is_set():
                    log.info(
                        "Received %s: finishing running runs (up to %.0fs), handing back the rest",
                        signal.Signals(signum).name,
                        self.config.grace_seconds,
                    )
                    self.drain()
                else:
                    log.warning("Second signal: handing back running runs now")
                    for held in list(self.held.values()):
                        if held.started and not held.finished:
                            held.stop("shutdown")

    async def _drain(self, runs: TaskGroup) -> None:
        for held in list(self.held.values()):
            if not held.started:
                held.stop("shutdown")
        with anyio.move_on_after(self.config.grace_seconds):
            await self._until(lambda: all(h.finished or not h.started for h in self.held.values()))
        for held in list(self.held.values()):
            if not held.finished:
                held.stop("shutdown")
        # Sync tasks cannot be interrupted: wait for their threads a little
        # longer; runs still going after that are left to their lease.
        with anyio.move_on_after(5):
            await self._until(lambda: all(h.finished for h in self.held.values()))
        runs.cancel_scope.cancel()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._finished.wait()

    def _mark_finished(self, held: Held) -> None:
        held.finished = True
        self._finished.set()
        self._finished = anyio.Event()

    # -- the feed --------------------------------------------------------

    async def _feed(self, runs: TaskGroup) -> None:
        assert self.client is not None
        delay = 0.1
        names = sorted(self.tasks)
        while not self._draining.is_set():
            try:
                async for kind, payload in self.client.feed(names, self.config.slots):
                    if kind == "hello":
                        self._hello(payload)
                        delay = 0.1
                    elif kind == "runs":
                        for delivery in payload:
                            self._receive(delivery, runs)
                    elif kind == "bye":
                        log.debug("Feed closed by the server; reconnecting")
                continue
            except AccessDenied as exc:
                log.error("%s", exc)
                self.fatal = exc
                self.drain()
                return
            except (httpx.HTTPError, BgTasksError, ValueError) as exc:
                log.warning(
                    "Feed at %s unavailable (%s: %s); retrying in %.1fs",
                    self.config.url,
                    type(exc).__name__,
                    exc,
                    delay,
                )
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.config.max_reconnect_seconds)

    def _hello(self, hello: Any) -> None:
        self.lease_seconds = hello.lease_seconds
        self.heartbeat_seconds = hello.heartbeat_seconds
        self.report_interval = hello.report_interval
        self.max_body_bytes = hello.max_body_bytes
        self.max_result_bytes = min(self.config.max_result_bytes, hello.max_result_bytes)
        assert self.client is not None
        # The hello was written after we asked for the feed, so this offset
        # is never too small: ages computed with it are never too young.
        self._clock_offset = (
            hello.clock - self.client.feed_asked_at if hello.clock is not None else None
        )
        self._hello_received.set()
        if not self._connected_once:
            self._connected_once = True
            log.info(
                "Worker %s connected to %s (%d tasks)",
                self.worker_id,
                self.config.url,
                len(self.tasks),
            )
        else:
            log.info("Worker %s reconnected to %s", self.worker_id, self.config.url)

    def _receive(self, delivery: Delivery, runs: TaskGroup) -> None:
        held = self.held.get(delivery.id)
        if held is not None:
            if (
                held.delivery.lease_token != delivery.lease_token
                and not held.finished
                and held.stop_reason is None
            ):
                # Our lease lapsed and the run came back to us: carry on under
                # the new lease (one execution, so no overlap) and say so.
                log.warning("Run %s: continuing under a new lease", delivery.id)
                held.delivery = delivery
                held.last_renewed = time.monotonic()
                if held.started:
                    self._enqueue(_report(delivery, "RUNNING"), self._on_running_outcome(held))
            return  # otherwise: re-sent after a reconnect, already ours
        now = time.monotonic()
        held = Held(
            delivery=delivery,
            context=RunContext(str(delivery.id), delivery.task, delivery.attempt),
            last_renewed=now,
        )
        leased = self._leased_locally(delivery)
        if leased is not None and now - leased < self.lease_seconds / 4:
            # The lease is at most a quarter old: it cannot have expired, nor
            # the run gone to a successor, so it may start before the app
            # answers its RUNNING report. Fencing counts from the lease's
            # start, not from now.
            held.fresh = True
            held.last_renewed = min(leased, now)
        self.held[delivery.id] = held
        runs.start_soon(self._execute, held, name=f"run {delivery.id}")

    def _leased_locally(self, delivery: Delivery) -> float | None:
        """The earliest moment, on our clock, the delivery's lease can have
        started; None when unknown (a re-sent delivery, an older app)."""
        if delivery.leased_at is None or self._clock_offset is None:
            return None
        return delivery.leased_at - self._clock_offset

    # -- running one run -------------------------------------------------

    async def _execute(self, held: Held) -> None:
        d = held.delivery
        acquired = False
        with held.wait_scope:
            await self._limiter.acquire()
            acquired = True
        if not acquired:
            # Never started: hand it back (or, if cancelled, say so).
            if held.stop_reason == "cancel":
                self._final(held, _report(held.delivery, "CANCELLED"))
            elif held.stop_reason == "lost":
                self._forget(held)
            else:
                self._final(held, _report(held.delivery, "RELEASED"))
            return
        try:
            held.started = True
            if held.fresh and held.stop_reason is None:
                # Reported in the next batch; a refusal stops the run.
                self._enqueue(_report(held.delivery, "RUNNING"), self._on_running_outcome(held))
            elif not await self._confirm_start(held):
                self._mark_finished(held)
                return
            log.info("Received task run: %s - %s", d.id, d.task)
            report = await self._call(held)
        finally:
            self._limiter.release()
        self._mark_finished(held)
        if held.stop_reason == "lost":
            log.warning("Task run %s - %s: lease lost; result dropped", d.id, d.task)
            self._forget(held)
            return
        log.info("Task run %s - %s: Finished in state %s", d.id, d.task, _state_label(report))
        self._final(held, report)

    async def _confirm_start(self, held: Held) -> bool:
        """Report RUNNING and wait for the app to accept it before calling the
        task: a delivery that may have sat in a half-open link while its lease
        expired is refused here, so it never runs beside its successor. Fresh
        deliveries skip this (see _receive)."""
        confirmed = anyio.Event()
        outcome: list[str] = []
        check = self._on_running_outcome(held)

        def answered(result: str) -> None:
            outcome.append(result)
            confirmed.set()
            check(result)

        self._enqueue(_report(held.delivery, "RUNNING"), answered, urgent=True)
        with anyio.CancelScope() as scope:
            held.scope = scope
            if held.stop_reason is not None:
                scope.cancel()
            await confirmed.wait()
        held.scope = None
        if outcome and outcome[0] in ("accepted", "duplicate") and held.stop_reason is None:
            return True
        reason = held.stop_reason
        if outcome and outcome[0] in ("stale", "unknown"):
            log.warning(
                "Run %s: the app refused its start (%s); not running it",
                held.delivery.id,
                outcome[0],
            )
            self._forget(held)
        elif reason == "cancel":
            self._final(held, _report(held.delivery, "CANCELLED"))
        elif reason == "lost":
            self._forget(held)
        else:
            self._final(held, _report(held.delivery, "RELEASED"))
        return False

    async def _call(self, held: Held) -> Report:
        outcome = await self._outcome(held)
        # Built now, not at the start: the run may have moved to a new lease
        # of ours while it ran (see _receive).
        return outcome.model_copy(update={"lease_token": held.delivery.lease_token})

    async def _outcome(self, held: Held) -> Report:
        d = held.delivery
        task = self.tasks.get(d.task)
        if task is None:  # the feed only sends what we asked for; defensive
            return _report(
                d,
                "FAILED",
                error=ErrorInfo(
                    type="UnknownTask", message=f"This worker does not serve task {d.task!r}."
                ),
            )
        try:
            args, kwargs = task.load_arguments(d.args, d.kwargs)
        except ValidationError as exc:
            return _report(d, "FAILED", error=_error_info(exc))
        token = _current.set(held.context)
        if d.timeout_seconds:
            self._runs.start_soon(self._deadline, held, d.timeout_seconds)
        value: Any = None
        try:
            with anyio.CancelScope() as scope:
                held.scope = scope if task.is_async else None
                if held.stop_reason is not None:
                    scope.cancel()
                if task.is_async:
                    value = await task.fn(*args, **kwargs)
                else:
                    # A thread cannot be interrupted: it keeps its slot and
                    # lease until it returns (DESIGN §4, sync tasks).
                    value = await _in_daemon_thread(lambda: task.fn(*args, **kwargs), d)
        except Exception as exc:
            if held.stop_reason is None:
                return _report(d, "FAILED", error=_error_info(exc))
        finally:
            _current.reset(token)
            held.scope = None
            held.deadline_scope.cancel()
        reason = held.stop_reason
        if reason == "timeout":
            return _report(
                d,
                "FAILED",
                error=ErrorInfo(
                    type="TimeoutError",
                    message=f"The run took longer than its timeout of {d.timeout_seconds:g}s.",
                ),
            )
        if reason == "cancel":
            return _report(d, "CANCELLED")
        if reason == "shutdown":
            return _report(d, "RELEASED")
        if reason == "lost":
            return _report(d, "RELEASED")  # dropped by the caller
        try:
            result = task.dump_result(value)
        except NotSerializable as exc:
            return _report(d, "FAILED", error=ErrorInfo(type="NotSerializable", message=str(exc)))
        size = _json_size(result)
        if size > self.max_result_bytes:
            return _report(
                d,
                "FAILED",
                error=ErrorInfo(
                    type="ResultTooLarge",
                    message=f"The result is {size} bytes as JSON; the limit is "
                    f"{self.max_result_bytes}.",
                ),
            )
        return _report(d, "COMPLETED", result=result)

    async def _deadline(self, held: Held, seconds: float) -> None:
        with held.deadline_scope:
            await anyio.sleep(seconds)
            held.stop("timeout")

    def _forget(self, held: Held) -> None:
        self._mark_finished(held)
        self.held.pop(held.delivery.id, None)

    def _final(self, held: Held, report: Report) -> None:
        self._mark_finished(held)

        def settled(_outcome: str) -> None:
            # Keep renewing the lease until the final report has landed.
            self.held.pop(held.delivery.id, None)

        if report.state == "COMPLETED":
            self._drop_unsent_running(report)
        # Sent without the batching window: the app frees this worker's
        # credit (and leases it the next run) only once it lands. Under load
        # reports still share requests: they queue while one is in flight.
        self._enqueue(report, settled, urgent=True)

    def _drop_unsent_running(self, final: Report) -> None:
        """A short run finished before its RUNNING report left: send only
        the COMPLETED one. The app records the run as RUNNING on the way
        (its history shows PENDING → RUNNING → COMPLETED), and the batch
        costs one statement instead of two."""
        for index in range(self._in_flight, len(self._pending)):
            queued = self._pending[index].report
            if (
                queued.state == "RUNNING"
                and queued.run_id == final.run_id
                and queued.lease_token == final.lease_token
            ):
                del self._pending[index]
                return

    def _on_running_outcome(self, held: Held) -> Callable[[str], None]:
        def check(outcome: str) -> None:
            if outcome in ("stale", "unknown"):
                log.warning("Run %s is no longer ours (%s); stopping it", held.delivery.id, outcome)
                held.stop("lost")

        return check

    # -- reports ---------------------------------------------------------

    def _enqueue(
        self, report: Report, on_outcome: Callable[[str], None] | None, *, urgent: bool = False
    ) -> None:
        self._pending.append(_Pending(report, on_outcome))
        self._pending_event.set()
        if urgent:  # a run waits for this answer: skip the batching window
            self._urgent.set()

    async def _reporter(self, scope: anyio.CancelScope) -> None:
        with scope:
            delay = 0.2
            while True:
                await self._pending_event.wait()
                # A short window lets one POST carry many reports, cut short
                # when a run waits to start.
                with anyio.move_on_after(self.report_interval):
                    await self._urgent.wait()
                # Let runs that are ready to finish in this turn of the loop
                # (a batch of short tasks) queue their reports first: one
                # request and one statement for them all, not 1 then 19.
                for _ in range(5):
                    await anyio.lowlevel.checkpoint()
                self._urgent = anyio.Event()
                if await self._flush_once():
                    delay = 0.2
                else:  # refused credentials: do not hammer (or lock out) the app
                    await anyio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 10.0)

    async def _flush_all(self) -> None:
        while self._pending:
            if not await self._flush_once():
                await anyio.sleep(0.2)

    async def _flush_once(self) -> bool:
        """Send what is queued, oldest first; on failure keep it queued.
        One flush at a time (the reporter's and the final one at shutdown):
        a sent batch is removed from the queue by position."""
        async with self._flush_lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        assert self.client is not None
        delay = 0.1
        while self._pending:
            batch = self._next_batch()
            self._in_flight = len(batch)
            try:
                outcomes = await self.client.post_reports([p.encoded for p in batch])
            except AccessDenied as exc:
                log.error("Reports refused: %s", exc)
                return False
            except RemoteError as exc:
                if exc.remote_status in (413, 422) and len(batch) > 1:
                    # Something between us and the app allows less: send fewer.
                    self._batch_cap = max(1, len(batch) // 2)
                    continue
                if exc.remote_status in (413, 422) and len(batch) == 1:
                    first = batch[0]
                    if first.replaced:
                        log.error(
                            "Run %s: report refused again (%s); dropped", first.report.run_id, exc
                        )
                        del self._pending[0]
                        if first.on_outcome is not None:
                            first.on_outcome("stale")
                        continue
                    # This one report can never be accepted: say why instead.
                    self._pending[0] = _Pending(_refused(first.report, exc), first.on_outcome, True)
                    continue
                log.warning("Reports not delivered (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            except (httpx.HTTPError, BgTasksError) as exc:
                log.warning(
                    "Reports not delivered (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await anyio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            finally:
                self._in_flight = 0
            del self._pending[: len(batch)]
            self._batch_cap = min(MAX_BATCH, self._batch_cap * 2)
            for pending, outcome in zip(batch, outcomes, strict=False):
                if outcome == "stale" and pending.report.state != "RUNNING":
                    log.warning(
                        "Run %s: report refused as stale (the lease moved on); dropped",
                        pending.report.run_id,
                    )
                if pending.on_outcome is not None:
                    pending.on_outcome(outcome)
        self._pending_event = anyio.Event()
        return True

    def _next_batch(self) -> list[_Pending]:
        """The oldest reports that fit in one request body."""
        budget = int(self.max_body_bytes * 0.9) - 200
        batch: list[_Pending] = []
        used = 0
        for pending in self._pending[: min(MAX_BATCH, self._batch_cap)]:
            size = len(pending.encoded) + 1  # the very bytes sent, and a comma
            if batch and used + size > budget:
                break
            batch.append(pending)
            used += size
        return batch

    # -- heartbeats ------------------------------------------------------

    async def _heartbeats(self, scope: anyio.CancelScope) -> None:
        assert self.client is not None
        with scope:
            await self._hello_received.wait()  # the feed's timing, not ours
            while True:
                await anyio.sleep(self.heartbeat_seconds)
                held = list(self.held.values())
                if held:
                    await self._beat(held)
                self._fence()

    async def _beat(self, held: list[Held]) -> None:
        assert self.client is not None
        sent_at = time.monotonic()
        sent = {h.delivery.id: h.delivery.lease_token for h in held}
        try:
            with anyio.fail_after(self._request_timeout()):
                answer = await self.client.heartbeat(list(sent.items()))
        except (httpx.HTTPError, BgTasksError, TimeoutError) as exc:
            log.warning("Heartbeat failed (%s: %s)", type(exc).__name__, exc)
            return
        renewed = set(answer.renewed)
        for h in held:
            if h.delivery.id in renewed and h.delivery.lease_token == sent[h.delivery.id]:
                h.last_renewed = sent_at
        for run_id in answer.stop:
            h2 = self.held.get(run_id)
            # Only if it still holds the lease we asked about (not a newer one).
            if h2 is not None and not h2.finished and h2.delivery.lease_token == sent.get(run_id):
                log.warning("Run %s: lease no longer ours; stopping it", run_id)
                h2.stop("lost")
        for run_id in answer.cancel:
            h3 = self.held.get(run_id)
            if h3 is not None and not h3.finished:
                log.info("Run %s: cancel requested", run_id)
                h3.stop("cancel")

    def _request_timeout(self) -> float:
        return max(0.2, min(5.0, self.lease_seconds / 6))

    def _fence(self) -> None:
        """Stop runs whose lease may expire before we can renew it, so this
        worker never overlaps the one the run goes to next."""
        margin = self.heartbeat_seconds + self._request_timeout()
        limit = self.lease_seconds - margin
        now = time.monotonic()
        for h in list(self.held.values()):
            if not h.finished and now - h.last_renewed > limit:
                log.warning(
                    "Run %s: lease not renewed for %.1fs; stopping it before it expires",
                    h.delivery.id,
                    now - h.last_renewed,
                )
                h.stop("lost")


def _report(
    d: Delivery, state: ReportState, *, result: Any = None, error: ErrorInfo | None = None
) -> Report:
    return Report(run_id=d.id, lease_token=d.lease_token, state=state, result=result, error=error)


def _refused(report: Report, exc: RemoteError) -> Report:
    """What to report instead of a report the app refused as too large or invalid."""
    error = ErrorInfo(
        type="ResultTooLarge" if exc.remote_status == 413 else "ReportRefused",
        message=f"The app refused this run's report ({exc.remote_status}): {exc.message}"[:2000],
    )
    state: ReportState = "FAILED" if report.state in ("COMPLETED", "FAILED") else report.state
    return Report(run_id=report.run_id, lease_token=report.lease_token, state=state, error=error)


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


def _json_size(value: Any) -> int:
    import json

    return len(json.dumps(value, separators=(",", ":")))


def _error_info(exc: BaseException) -> ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK:
        text = text[-MAX_TRACEBACK:]
    return ErrorInfo(
        type=type(exc).__name__[:200], message=_clean(str(exc)[:10000]), traceback=_clean(text)
    )


def _clean(text: str) -> str:
    """Valid UTF-8 whatever the exception held (a lone surrogate, say)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _state_label(report: Report) -> str:
    if report.state == "COMPLETED":
        return "Completed()"
    if report.state == "FAILED":
        error = report.error
        return f"Failed('{error.type}: {error.message}')" if error else "Failed()"
    if report.state == "CANCELLED":
        return "Cancelled()"
    return "HandedBack()"


def configure_logging(level: str | int = "INFO") -> None:
    """The worker's log format, unless the host configured logging already."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=level,
        format="%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s",
        datefmt="%H:%M:%S",
    )
    # One line per request would drown the run lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def run_worker(registry: TaskRegistry, task_names: list[str], config: WorkerConfig) -> None:
    await Worker(registry, task_names, config).run()
