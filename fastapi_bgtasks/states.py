"""Run states and the lifecycle as data: which states are terminal, which
hold a lease, and every edge a run may take. The store builds its
compare-and-set statements and its reading of repeated reports from the
edge table below; the worker and the docs read it too. Nothing here imports
from the package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ACTIVE_STATES",
    "EDGES",
    "MAX_REJECTIONS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Edge",
    "Event",
    "Outcome",
    "ReportKind",
    "RunState",
    "StopReason",
    "repeats_of",
    "sources_of",
]


class RunState(enum.StrEnum):
    """Where a run is on its path. See docs/architecture.md for the diagram."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED, RunState.CRASHED}
)
# Runs a worker holds a lease on.
ACTIVE_STATES = frozenset({RunState.PENDING, RunState.RUNNING})


class ReportKind(enum.StrEnum):
    """What a worker says of one run. RELEASED hands back a run it will not
    finish; REJECTED one it cannot accept (a task it does not serve, or
    arguments that do not fit its signature of the task), never started."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RELEASED = "RELEASED"
    REJECTED = "REJECTED"


class Event(enum.StrEnum):
    """What moves a run: a submit, the app's own steps, an operator, or a
    worker's report (the report events are named after their ReportKind)."""

    SUBMIT = "submit"
    CLAIM = "claim"  # the feed leases a due run to a worker
    RELEASE_UNSENT = "release_unsent"  # claimed, never written to the stream
    CANCEL = "cancel"  # an operator cancels a run no worker holds
    REAP = "reap"  # the lease expired
    RUNNING = ReportKind.RUNNING.value
    COMPLETED = ReportKind.COMPLETED.value
    FAILED = ReportKind.FAILED.value
    CANCELLED = ReportKind.CANCELLED.value
    RELEASED = ReportKind.RELEASED.value
    REJECTED = ReportKind.REJECTED.value


@dataclass(frozen=True)
class Edge:
    """One way a run moves: `event` takes it from any of `sources` to
    `target` when `guard` holds (None: always); `effects` names what else
    the statement sets, for the reader (the store's statements do it)."""

    event: Event
    sources: frozenset[RunState]
    target: RunState
    guard: str | None = None
    effects: str = ""


S = RunState
_LEASED = ACTIVE_STATES

# The lifecycle. A guard is the condition, in the row's own terms, that
# picks this edge among the event's; the store checks it in SQL.
EDGES: tuple[Edge, ...] = (
    Edge(Event.SUBMIT, frozenset(), S.SCHEDULED, effects="history starts"),
    Edge(Event.CLAIM, frozenset({S.SCHEDULED}), S.PENDING, "due and credit left",
         "attempt + 1, lease token and expiry set"),
    Edge(Event.CANCEL, frozenset({S.SCHEDULED}), S.CANCELLED, effects="finished now"),
    Edge(Event.RELEASE_UNSENT, frozenset({S.PENDING}), S.SCHEDULED, "same lease",
         "attempt - 1, lease cleared"),
    Edge(Event.RUNNING, frozenset({S.PENDING}), S.RUNNING, "same lease", "started now"),
    Edge(Event.COMPLETED, _LEASED, S.COMPLETED, "same lease, result fits",
         "result stored, finished now"),
    Edge(Event.FAILED, _LEASED, S.SCHEDULED,
         "same lease, attempts left, retryable, no cancel asked", "due after the back-off"),
    Edge(Event.FAILED, _LEASED, S.FAILED, "same lease, otherwise", "error stored, finished"),
    Edge(Event.CANCELLED, _LEASED, S.CANCELLED, "same lease", "finished now"),
    Edge(Event.RELEASED, _LEASED, S.CANCELLED, "same lease, cancel asked", "finished now"),
    Edge(Event.RELEASED, _LEASED, S.SCHEDULED, "same lease, otherwise",
         "a rescue spent if it ran (else the attempt given back)"),
    Edge(Event.REJECTED, frozenset({S.PENDING}), S.CANCELLED, "same lease, cancel asked",
         "finished now"),
    Edge(Event.REJECTED, frozenset({S.PENDING}), S.FAILED, "same lease, rejections spent",
         "the worker's UnknownTask or IncompatibleArguments error stored, finished now"),
    Edge(Event.REJECTED, frozenset({S.PENDING}), S.SCHEDULED, "same lease, otherwise",
         "attempt - 1, reason 'rejected: <error type>', kept from workers of that signature, "
         "due after a back-off from the second rejection on"),
    Edge(Event.REAP, _LEASED, S.CANCELLED, "lease expired, cancel asked", "finished now"),
    Edge(Event.REAP, _LEASED, S.CRASHED, "lease expired, rescues spent",
         "WorkerLost error, finished now"),
    Edge(Event.REAP, _LEASED, S.SCHEDULED, "lease expired, otherwise",
         "a rescue spent, due now"),
)  # fmt: skip


# How many times workers may reject one run (REJECTED reports: an unknown
# task, arguments that do not fit) before it ends FAILED with the last
# worker's error. A rejection spends no retry and no rescue.
MAX_REJECTIONS = 10


def sources_of(event: Event) -> frozenset[RunState]:
    """The states `event` may move a run out of: its compare-and-set condition."""
    return frozenset().union(*(e.sources for e in EDGES if e.event == event))


def targets_of(event: Event) -> frozenset[RunState]:
    return frozenset(e.target for e in EDGES if e.event == event)


def repeats_of(kind: ReportKind) -> frozenset[RunState]:
    """States in which a report of `kind` under the run's own lease changes
    nothing because it already happened: a `duplicate`, not `stale`.

    A worker reads `duplicate` to a RUNNING report as leave to start the
    run, so a RUNNING report repeats only RUNNING: on a run its lease has
    already settled (a re-sent delivery of a run just finished) it is
    `stale`, and the run is not started again."""
    return targets_of(Event(kind.value))


# Every edge a run may take, named after what makes it (docs/architecture.md).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    state: frozenset(e.target for e in EDGES if state in e.sources) for state in RunState
}


class Outcome(enum.StrEnum):
    """The app's answer to one report."""

    ACCEPTED = "accepted"  # applied
    DUPLICATE = "duplicate"  # identical to what is stored: nothing to do
    STALE = "stale"  # the lease is gone, or settled the run: do not run it, drop its result
    UNKNOWN = "unknown"  # no run has that id


class StopReason(enum.StrEnum):
    """Why a worker stops a run before the task returns; decides its final report."""

    CANCEL = "cancel"  # an operator cancelled it: CANCELLED
    TIMEOUT = "timeout"  # timeout_seconds passed: FAILED TimeoutError (retries apply)
    LOST = "lost"  # the lease could not be renewed: no report, the run is another's
    SHUTDOWN = "shutdown"  # the worker drains: RELEASED, given back without a retry spent
