"""The lifecycle is one table of edges in states.py: the transitions the
docs draw, the states each statement may move a run out of, and which
repeated reports are harmless are all read from it."""

from __future__ import annotations

from fastapi_bgtasks.states import (
    ACTIVE_STATES,
    EDGES,
    TRANSITIONS,
    Event,
    ReportKind,
    RunState,
    repeats_of,
    sources_of,
)

S = RunState


def test_the_transitions_derived_from_the_edges_are_the_diagrams() -> None:
    assert TRANSITIONS == {
        S.SCHEDULED: {S.PENDING, S.CANCELLED},
        S.PENDING: {S.SCHEDULED, S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED},
        S.RUNNING: {S.SCHEDULED, S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED},
        S.COMPLETED: set(),
        S.FAILED: set(),
        S.CANCELLED: set(),
        S.CRASHED: set(),
    }


def test_only_a_claim_and_a_cancel_move_a_waiting_run_and_reports_need_a_lease() -> None:
    assert {e.event for e in EDGES if S.SCHEDULED in e.sources} == {Event.CLAIM, Event.CANCEL}
    assert sources_of(Event.RUNNING) == {S.PENDING}
    assert sources_of(Event.RELEASE_UNSENT) == {S.PENDING}
    for kind in (ReportKind.COMPLETED, ReportKind.FAILED, ReportKind.CANCELLED):
        assert sources_of(Event(kind.value)) == ACTIVE_STATES
    assert sources_of(Event.REAP) == ACTIVE_STATES


def test_a_report_repeats_when_the_run_is_where_that_report_takes_it() -> None:
    assert {kind: repeats_of(kind) for kind in ReportKind} == {
        # Not a run its lease already settled: `duplicate` lets a worker
        # start the run, and a settled run must not run again.
        ReportKind.RUNNING: {S.RUNNING},
        ReportKind.COMPLETED: {S.COMPLETED},
        ReportKind.CANCELLED: {S.CANCELLED},
        ReportKind.FAILED: {S.FAILED, S.SCHEDULED},
        ReportKind.RELEASED: {S.SCHEDULED, S.CANCELLED},
        ReportKind.REJECTED: {S.SCHEDULED, S.FAILED, S.CANCELLED},
    }


def test_every_report_kind_is_an_event_of_the_lifecycle() -> None:
    events = {e.event for e in EDGES}
    assert {Event(kind.value) for kind in ReportKind} <= events
    assert all(e.target in TRANSITIONS for e in EDGES)
