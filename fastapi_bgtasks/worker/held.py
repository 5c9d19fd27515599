"""The runs a worker holds a lease on, from delivery to its final report.
The feed adds them, execution moves each through its phases, heartbeats
renew and fence them, and a landed final report lets it go.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ..states import Outcome, StopReason
from ..wire import Delivery
from .context import RunContext

if TYPE_CHECKING:
    from .acceptance import Call

__all__ = ["HeldRun", "Phase", "Roster"]

log = logging.getLogger("fastapi_bgtasks.worker")


class Phase(enum.Enum):
    """Where a held run is in this worker. RECEIVED waits for a slot;
    STARTED has one (it waits for the app to accept its start unless it is
    fresh, then runs); FINISHED has its final report queued (or none: the
    lease was lost); REPORTED: the app answered it, and the run is no longer
    held."""

    RECEIVED = "received"
    STARTED = "started"
    FINISHED = "finished"
    REPORTED = "reported"


@dataclass
class HeldRun:
    """A run this worker holds a lease on."""

    delivery: Delivery
    context: RunContext
    # Our clock when the lease was last known good: fencing counts from it.
    last_renewed: float
    fresh: bool = False  # provably leased moments ago: start without confirming
    call: Call | None = None  # its arguments, validated as it arrived
    phase: Phase = Phase.RECEIVED
    stop_reason: StopReason | None = None
    # What `stop()` cancels once the run has a slot: its runner's scope,
    # while the run waits for its start to be accepted and while an async
    # task (or a sync task's child process) runs.
    scope: anyio.CancelScope | None = None
    # What `stop()` calls while the run waits for a slot: it ends there.
    on_stop_waiting: Callable[[HeldRun], None] | None = None

    @property
    def started(self) -> bool:
        return self.phase is not Phase.RECEIVED

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.REPORTED)

    def stop(self, reason: StopReason) -> None:
        """Ask the run to stop; the first reason given decides its final
        report. An async task is cancelled, and so is the wait on a sync
        task's child process (which is then killed); a sync task in a thread
        cannot be, so it only sees `cancelled()` turn true and keeps its slot
        and lease until it returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.context.stop.set()
        if self.scope is not None:
            self.scope.cancel()
        elif self.phase is Phase.RECEIVED and self.on_stop_waiting is not None:
            self.on_stop_waiting(self)

    def running_answered(self, outcome: Outcome) -> None:
        """The app's answer to this run's RUNNING report: refused means the
        lease went elsewhere (or already settled the run), so the run must
        stop; a run already finished has nothing left to stop."""
        if outcome in (Outcome.STALE, Outcome.UNKNOWN) and not self.finished:
            log.warning("Run %s is no longer ours (%s); stopping it", self.delivery.id, outcome)
            self.stop(StopReason.LOST)


class Roster:
    """The held runs by id, and a wake-up each time one finishes (the drain
    waits on conditions over them)."""

    # How many given-up leases it remembers (tokens are unique, so an old one
    # never matches a new delivery; a re-send comes within a lease or so).
    ABANDONED_KEPT = 4096

    def __init__(self) -> None:
        self.runs: dict[uuid.UUID, HeldRun] = {}
        # Set and dropped each time a run finishes; made only when waited on.
        self._finished: anyio.Event | None = None
        # Lease tokens of runs let go without a report (their lease was lost,
        # or their process died): a delivery re-sent under one of them, as on
        # a feed reconnect before the app saw the run start, is not run again.
        self._abandoned: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, run_id: uuid.UUID) -> HeldRun | None:
        return self.runs.get(run_id)

    def add(self, held: HeldRun) -> None:
        self.runs[held.delivery.id] = held

    def all(self) -> list[HeldRun]:
        return list(self.runs.values())

    def finish(self, held: HeldRun) -> None:
        if not held.finished:
            held.phase = Phase.FINISHED
        if self._finished is not None:
            self._finished.set()
            self._finished = None

    def release(self, held: HeldRun) -> None:
        """No longer ours: its final report landed, or it has none."""
        self.finish(held)
        held.phase = Phase.REPORTED
        self.runs.pop(held.delivery.id, None)

    def abandon(self, held: HeldRun) -> None:
        """Let go of a run with no report: its lease is left to expire (a
        rescue spent), and this worker never runs it again under that lease."""
        self._abandoned[held.delivery.lease_token] = None
        while len(self._abandoned) > self.ABANDONED_KEPT:
            del self._abandoned[next(iter(self._abandoned))]
        self.release(held)

    def abandoned(self, lease_token: str) -> bool:
        return lease_token in self._abandoned

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if self._finished is None:
                self._finished = anyio.Event()
            await self._finished.wait()
