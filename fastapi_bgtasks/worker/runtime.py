"""④ The worker runtime: one anyio task group that subscribes to the feed and
hands each delivery to execution, beside the reporter and the heartbeats.

Shutdown is a drain: stop taking runs, hand back the ones not started, let
running ones finish within the grace period (still heartbeating), then hand
back the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskGroup

from ..backoff import Backoff
from ..client import ApiClient, HttpRoute
from ..errors import AccessDenied, BgTasksError, ConfigurationError
from ..states import ReportKind, StopReason
from ..wire import Delivery, ErrorInfo, Hello
from .acceptance import load_call
from .config import FeedTerms, WorkerConfig
from .context import RunContext
from .execution import Executor, make_report
from .held import HeldRun, Roster
from .isolation import ChildPool
from .leases import Leases
from .reporter import Reporter

if TYPE_CHECKING:
    from ..tasks import Task, TaskRegistry

__all__ = ["Worker", "WorkerConfig", "configure_logging", "run_worker"]

log = logging.getLogger("fastapi_bgtasks.worker")

# The feed, heartbeats, reports and the tasks' own submits share these.
_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=10)


def make_worker_id() -> str:
    """host:pid:random, made once per process and kept across reconnects."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Serves `task_names` of `registry` from the app at `config.url`. Its
    API client is made here and closed when `run()` ends."""

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
        # Timing comes from the feed's hello, never from this process's hub.
        self.terms = FeedTerms(max_result_bytes=config.max_result_bytes)
        self.client = ApiClient(
            config.url, config.token, worker_id=self.worker_id, timeout=10.0, limits=_LIMITS
        )
        self.roster = Roster()
        self.reporter = Reporter(self.client.reports, lambda: self.terms)
        self.leases = Leases(self.roster, self.client.heartbeat, lambda: self.terms)
        self.children = (
            ChildPool(config, self.tasks) if config.sync_isolation == "process" else None
        )
        self.executor = Executor(
            self.tasks,
            self.roster,
            self.reporter.queue,
            lambda: self.terms,
            config.concurrency,
            self.children,
        )
        self._draining = anyio.Event()
        self._feed_scope = anyio.CancelScope()
        self._connected = anyio.Event()
        self.fatal: BaseException | None = None

    # -- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Serve until drained (signal or `drain()`), or a fatal refusal."""
        self.registry.worker_route = HttpRoute(self.config.url, self.config.token, self.client)
        self.registry.worker_loop = asyncio.get_running_loop()
        try:
            if self.children is not None:
                await self.children.start()
            async with anyio.create_task_group() as tg:
                if self.config.handle_signals:
                    tg.start_soon(self._signals)
                tg.start_soon(self.reporter.run)
                tg.start_soon(self.leases.run, self._connected)
                async with anyio.create_task_group() as runs:
                    with self._feed_scope:
                        await self._feed(runs)
                    # The feed ended: we are draining.
                    await self._drain(runs)
                # Every run has its final report queued; send them, shielded.
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await self.reporter.flush_all()
                tg.cancel_scope.cancel()
        finally:
            self.registry.worker_route = None
            self.registry.worker_loop = None
            with anyio.CancelScope(shield=True):
                if self.children is not None:
                    await self.children.aclose()
                await self.client.aclose()
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
                    for held in self.roster.all():
                        if held.started and not held.finished:
                            held.stop(StopReason.SHUTDOWN)

    async def _drain(self, runs: TaskGroup) -> None:
        roster = self.roster
        for held in roster.all():
            if not held.started:
                held.stop(StopReason.SHUTDOWN)
        with anyio.move_on_after(self.config.grace_seconds):
            await roster.until(lambda: all(h.finished or not h.started for h in roster.all()))
        for held in roster.all():
            if not held.finished:
                held.stop(StopReason.SHUTDOWN)
        # Sync runs in child processes get a short grace, then are killed and
        # handed back; threads (--sync-isolation thread) cannot be
        # interrupted: wait for them a little longer; runs still going after
        # that are left to their lease.
        with anyio.move_on_after(5):
            await roster.until(lambda: all(h.finished for h in roster.all()))
        runs.cancel_scope.cancel()

    # -- the feed --------------------------------------------------------

    async def _feed(self, runs: TaskGroup) -> None:
        backoff = Backoff(
            min(0.1, self.config.max_reconnect_seconds), self.config.max_reconnect_seconds
        )
        names = sorted(self.tasks)
        signatures = [f"{name}:{self.tasks[name].codec.fingerprint}" for name in names]
        while not self._draining.is_set():
            # Before asking: see FeedTerms.from_hello.
            asked_at = time.monotonic()
            try:
                async for kind, payload in self.client.feed(names, self.config.slots, signatures):
                    if kind == "hello":
                        self.on_hello(payload, asked_at=asked_at)
                        backoff.reset()
                    elif kind == "runs":
                        for delivery in payload:
                            self.receive(delivery, runs)
                    elif kind == "bye":
                        log.debug("Feed closed by the server; reconnecting")
                continue
            except AccessDenied as exc:
                log.error("%s", exc)
                self.fatal = exc
                self.drain()
                return
            except (BgTasksError, ValueError) as exc:
                delay = backoff.next_delay()
                log.warning(
                    "Feed at %s unavailable (%s: %s); retrying in %.1fs",
                    self.config.url,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)

    def on_hello(self, hello: Hello, *, asked_at: float) -> None:
        """The feed's hello: its terms replace the ones in force.
        `asked_at`: our clock just before this feed was asked for."""
        first = not self._connected.is_set()
        self.terms = FeedTerms.from_hello(hello, self.config, asked_at=asked_at)
        self._connected.set()
        if first:
            log.info(
                "Worker %s connected to %s (%d tasks)",
                self.worker_id,
                self.config.url,
                len(self.tasks),
            )
        else:
            log.info("Worker %s reconnected to %s", self.worker_id, self.config.url)

    def receive(self, delivery: Delivery, runs: TaskGroup) -> HeldRun | None:
        """Hold a delivery and queue it for a slot, whose runner lives in
        `runs` (a delivery we
        hold already is re-sent after a reconnect, or leased to us anew);
        hand back at once one this worker cannot accept, and ignore one it
        gave up under the same lease (None)."""
        held = self.roster.get(delivery.id)
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
                    report = make_report(delivery, ReportKind.RUNNING)
                    self.reporter.queue.enqueue(report, held.running_answered)
            return held
        if self.roster.abandoned(delivery.lease_token):
            # Re-sent (a feed reconnect) before the app saw it start: this
            # worker already ran it under this lease and let it go.
            log.warning(
                "Run %s: re-sent under a lease it gave up; not running it again", delivery.id
            )
            return None
        loaded = load_call(self.tasks.get(delivery.task), delivery)
        if isinstance(loaded, ErrorInfo) and self.terms.takes_rejected:
            self._reject(delivery, loaded)
            return None
        # (To an older app, a run it cannot accept is reported FAILED, as before.)
        call = None if isinstance(loaded, ErrorInfo) else loaded
        now = time.monotonic()
        held = HeldRun(
            delivery=delivery,
            context=RunContext(str(delivery.id), delivery.task, delivery.attempt),
            last_renewed=now,
            call=call,
        )
        leased = self._leased_locally(delivery)
        if leased is not None and now - leased < self.terms.lease_seconds / 4:
            # The lease is at most a quarter old: it cannot have expired, nor
            # the run gone to a successor, so it may start before the app
            # answers its RUNNING report. Fencing counts from the lease's
            # start, not from now.
            held.fresh = True
            held.last_renewed = min(leased, now)
        self.roster.add(held)
        self.executor.submit(held, runs)
        return held

    def _reject(self, delivery: Delivery, error: ErrorInfo) -> None:
        """Hand back a run this worker cannot accept, without taking a slot:
        the app offers it to other workers, and no retry is spent."""
        log.warning(
            "Run %s - %s: cannot accept it (%s: %s); handing it back",
            delivery.id,
            delivery.task,
            error.type,
            error.message,
        )
        message = f"Worker {self.worker_id}: {error.message}"[:10_000]
        error = error.model_copy(update={"message": message})
        report = make_report(delivery, ReportKind.REJECTED, error=error)
        task = self.tasks.get(delivery.task)
        if task is not None:  # every worker with this signature will skip it
            report.signature = task.codec.fingerprint
        self.reporter.queue.enqueue(report, urgent=True)

    def _leased_locally(self, delivery: Delivery) -> float | None:
        """The earliest moment, on our clock, the delivery's lease can have
        started; None when unknown (a re-sent delivery, an older app)."""
        if delivery.leased_at is None or self.terms.clock_offset is None:
            return None
        return delivery.leased_at - self.terms.clock_offset


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
