"""The limit on guessing credentials: every refused worker credential is
counted against its client address, and past the limit that address gets
429 on the worker routes until the window passes.
"""

from __future__ import annotations

import time

from ..errors import RateLimited

__all__ = ["FailureThrottle"]


class FailureThrottle:
    """Counts refused credentials per client address; past `limit` refusals
    within `window` seconds that client gets 429 until the window passes,
    so a token cannot be guessed at network speed."""

    def __init__(self, limit: int = 30, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, ()) if now - t < self.window]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def check(self, client: str) -> None:
        if len(self._recent(client, time.monotonic())) >= self.limit:
            raise RateLimited(
                f"Too many refused credentials from this client; wait {self.window:.0f} s."
            )

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= self.max_clients and client not in self._failures:
            # Bounded memory: forget the client with the oldest failure.
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]
        self._failures.setdefault(client, []).append(now)
