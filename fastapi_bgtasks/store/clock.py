"""The lease clock: the time every lease deadline, renewal and expiry is
judged by. It is the app's wall clock read once, then advanced by the
monotonic clock, so a step of the host's clock after the app started (NTP
correcting a drift, an operator setting the time) cannot move it; a lease
that is steady in real time stays steady in the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["LeaseClock"]


class LeaseClock:
    """Wall time at the anchor plus monotonic time elapsed since.

    Anchored on first use at the app's wall clock, or earlier by `anchor`
    (on PostgreSQL the store anchors it at the database's clock when the
    lifespan starts, so app processes on hosts with skewed clocks agree to
    within the skew of that one clock between their starts).
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._origin: tuple[float, float] | None = None  # (wall, monotonic) seconds

    @property
    def anchored(self) -> bool:
        return self._origin is not None

    def anchor(self, wall_seconds: float, monotonic_seconds: float) -> None:
        """Tie the clock to a wall time observed at a monotonic instant."""
        self._origin = (wall_seconds, monotonic_seconds)

    def now(self) -> datetime:
        if self._origin is None:
            self._origin = (self._wall(), self._monotonic())
        wall, mono = self._origin
        return datetime.fromtimestamp(wall + (self._monotonic() - mono), UTC)

    def after(self, seconds: float) -> datetime:
        """The deadline `seconds` from now."""
        return self.now() + timedelta(seconds=seconds)
