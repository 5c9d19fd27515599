"""Run states and the lifecycle as data: which states are terminal, which
hold a lease, and every edge a run may take. The store, the worker and the
docs read these; nothing here imports from the package.
"""

from __future__ import annotations

import enum

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Outcome",
    "ReportKind",
    "RunState",
    "StopReason",
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

# Every edge a run may take, named after what makes it (docs/architecture.md).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.SCHEDULED: frozenset({RunState.PENDING, RunState.CANCELLED}),
    RunState.PENDING: frozenset(
        {
            RunState.SCHEDULED,  # released unsent, handed back, or lease expired
            RunState.RUNNING,
            RunState.COMPLETED,
            RunState.FAILED,
            RunState.CANCELLED,
            RunState.CRASHED,
        }
    ),
    RunState.RUNNING: frozenset(
        {
            RunState.SCHEDULED,  # retry after a failure, or lease expired
            RunState.COMPLETED,
            RunState.FAILED,
            RunState.CANCELLED,
            RunState.CRASHED,
        }
    ),
    RunState.COMPLETED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
    RunState.CRASHED: frozenset(),
}


class ReportKind(enum.StrEnum):
    """What a worker says of one run. RELEASED hands back a run it will not finish."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RELEASED = "RELEASED"


class Outcome(enum.StrEnum):
    """The app's answer to one report."""

    ACCEPTED = "accepted"  # applied
    DUPLICATE = "duplicate"  # identical to what is stored: nothing to do
    STALE = "stale"  # the lease is gone: stop the run, drop its result
    UNKNOWN = "unknown"  # no run has that id


class StopReason(enum.StrEnum):
    """Why a worker stops a run before the task returns; decides its final report."""

    CANCEL = "cancel"  # an operator cancelled it: CANCELLED
    TIMEOUT = "timeout"  # timeout_seconds passed: FAILED TimeoutError (retries apply)
    LOST = "lost"  # the lease could not be renewed: no report, the run is another's
    SHUTDOWN = "shutdown"  # the worker drains: RELEASED, given back without a retry spent
