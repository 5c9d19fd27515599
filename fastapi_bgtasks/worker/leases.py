"""Keeping the leases a worker holds: heartbeats renew them (and carry the
app's stop and cancel requests back), and fencing stops a run whose lease
may expire before it can be renewed, so this worker never runs beside the
one the run goes to next. An async run is also fenced step by step: after a
pause of the whole process (SIGSTOP), it takes no step once its lease may
have gone, before the heartbeat has even had a turn.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

import anyio

from ..errors import BgTasksError
from ..states import StopReason
from ..wire import HeartbeatResponse
from .config import FeedTerms
from .held import HeldRun, Roster

__all__ = ["Leases", "fence_steps"]

T = TypeVar("T")

log = logging.getLogger("fastapi_bgtasks.worker")

Heartbeat = Callable[[list[tuple[uuid.UUID, str]]], Awaitable[HeartbeatResponse]]


class Leases:
    """Renews the roster's leases through `heartbeat` (the API client's)."""

    def __init__(
        self,
        roster: Roster,
        heartbeat: Heartbeat,
        terms: Callable[[], FeedTerms],
    ) -> None:
        self.roster = roster
        self._heartbeat = heartbeat
        self._terms = terms

    async def run(self, connected: anyio.Event) -> None:
        """Beat every heartbeat interval, until cancelled; the timing is the
        feed's, so nothing happens before its first hello."""
        await connected.wait()
        while True:
            await anyio.sleep(self._terms().heartbeat_seconds)
            held = self.roster.all()
            if held:
                await self.beat(held)
            self.fence()

    async def beat(self, held: list[HeldRun]) -> None:
        sent_at = time.monotonic()
        sent = {h.delivery.id: h.delivery.lease_token for h in held}
        try:
            with anyio.fail_after(self._terms().request_timeout):
                answer = await self._heartbeat(list(sent.items()))
        except (BgTasksError, TimeoutError) as exc:
            log.warning("Heartbeat failed (%s: %s)", type(exc).__name__, exc)
            return
        renewed = set(answer.renewed)
        for h in held:
            if h.delivery.id in renewed and h.delivery.lease_token == sent[h.delivery.id]:
                h.last_renewed = sent_at
        for run_id in answer.stop:
            lost = self.roster.get(run_id)
            # Only if it still holds the lease we asked about (not a newer one).
            if (
                lost is not None
                and not lost.finished
                and lost.delivery.lease_token == sent.get(run_id)
            ):
                log.warning("Run %s: lease no longer ours; stopping it", run_id)
                lost.stop(StopReason.LOST)
        for run_id in answer.cancel:
            cancelled = self.roster.get(run_id)
            if cancelled is not None and not cancelled.finished:
                log.info("Run %s: cancel requested", run_id)
                cancelled.stop(StopReason.CANCEL)

    def fence(self) -> None:
        """Stop runs whose lease may expire before we can renew it."""
        terms = self._terms()
        limit = terms.lease_seconds - (terms.heartbeat_seconds + terms.request_timeout)
        now = time.monotonic()
        for h in self.roster.all():
            if not h.finished and now - h.last_renewed > limit:
                log.warning(
                    "Run %s: lease not renewed for %.1fs; stopping it before it expires",
                    h.delivery.id,
                    now - h.last_renewed,
                )
                h.stop(StopReason.LOST)


async def fence_steps(
    coro: Coroutine[Any, Any, T], held: HeldRun, terms: Callable[[], FeedTerms]
) -> T:
    """Await an async task's coroutine, but let it take a step (start, or go
    on after an await) only while its lease cannot have expired, judged on
    our monotonic clock. A process frozen past its lease wakes with every
    timer due at once and the task's may fire first: the task is then
    cancelled at the await it was suspended on, so what follows that await
    never runs (its `except` and `finally` blocks do)."""

    def may_step() -> bool:
        return time.monotonic() < terms().hard_deadline(held.last_renewed)

    def fence() -> None:
        if held.stop_reason is None:
            log.warning(
                "Run %s: lease past its deadline when the worker resumed; stopping it",
                held.delivery.id,
            )
        held.stop(StopReason.LOST)

    return await _StepFence(coro, may_step, fence)


class _StepFence(Generic[T]):
    """Drives a coroutine like `await` does, checking `may_step` before
    each step; when it fails, `fence` cancels the run's scope and this yields
    one loop turn to receive that cancellation, which goes into the coroutine
    instead of the step."""

    def __init__(
        self, coro: Coroutine[Any, Any, T], may_step: Callable[[], bool], fence: Callable[[], None]
    ) -> None:
        self._coro = coro
        self._may_step = may_step
        self._fence = fence

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        sent: Any = None
        error: BaseException | None = None
        try:
            while True:
                if error is None and not self._may_step():
                    self._fence()
                    try:
                        yield None  # a bare yield: one turn of the event loop
                    except GeneratorExit:
                        raise
                    except BaseException as exc:  # the cancellation, for the task
                        error = exc
                    continue
                try:
                    yielded = coro.send(sent) if error is None else coro.throw(error)
                except StopIteration as done:
                    value: T = done.value
                    return value
                error = None
                try:
                    sent = yield yielded
                except GeneratorExit:
                    raise
                except BaseException as exc:  # thrown in by the loop: the task's to see
                    error = exc
        finally:
            coro.close()
