"""The lease clock (store/clock.py): wall time at the anchor plus monotonic
time since, so a step of the wall clock after the anchor moves nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi_bgtasks.store.clock import LeaseClock


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall_seconds = 1_800_000_000.0
        self.monotonic_seconds = 50.0

    def wall(self) -> float:
        return self.wall_seconds

    def monotonic(self) -> float:
        return self.monotonic_seconds


def test_a_wall_clock_step_after_the_first_reading_moves_nothing() -> None:
    clocks = Clocks()
    clock = LeaseClock(clocks.wall, clocks.monotonic)
    start = clock.now()
    assert start == datetime.fromtimestamp(1_800_000_000.0, UTC)
    for step in (60.0, -180.0):
        clocks.wall_seconds += step
        assert clock.now() == start


def test_it_advances_with_the_monotonic_clock() -> None:
    clocks = Clocks()
    clock = LeaseClock(clocks.wall, clocks.monotonic)
    start = clock.now()
    clocks.monotonic_seconds += 2.5
    assert clock.now() - start == timedelta(seconds=2.5)
    assert clock.after(6) - start == timedelta(seconds=8.5)


def test_an_anchor_sets_the_wall_time_at_a_monotonic_instant() -> None:
    clocks = Clocks()
    clock = LeaseClock(clocks.wall, clocks.monotonic)
    clock.anchor(1_000.0, 40.0)  # the database's clock, read at monotonic 40
    assert clock.anchored
    assert clock.now() == datetime.fromtimestamp(1_010.0, UTC)
