"""Exponential back-off with jitter: the one way the package waits before it
tries again (a feed reconnect, a refused report, a heartbeat that failed, a
migration lock held by another process).
"""

from __future__ import annotations

import random

import anyio

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from `first` up to `cap`. With `jitter`, each one is
    drawn from [0.5, 1.5) of its nominal value, so many clients that failed
    together do not retry together."""

    def __init__(self, first: float, cap: float, *, jitter: bool = True) -> None:
        if not 0 < first <= cap:
            raise ValueError("Backoff needs 0 < first <= cap")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._nominal = first

    def reset(self) -> None:
        """After a success: the next failure waits `first` again."""
        self._nominal = self.first

    def next_delay(self) -> float:
        """The delay to wait now; the one after it is twice as long (up to `cap`)."""
        nominal = self._nominal
        self._nominal = min(nominal * 2, self.cap)
        return nominal * (0.5 + random.random()) if self.jitter else nominal

    async def sleep(self) -> None:
        """Wait the next delay."""
        await anyio.sleep(self.next_delay())
