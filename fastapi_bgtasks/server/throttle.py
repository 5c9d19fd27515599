"""The limit on guessing credentials: each refused credential is counted
against the pair (client address, credential fingerprint), and an address
that presented too many different refused credentials within the window is
answered 429 instead of 401 or 403 until the window passes.

The throttle only ever changes a refusal: a request is checked first, and one
that passes is never counted nor refused here, so a worker with the right
token is never locked out by its neighbours.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict

__all__ = ["FailureThrottle"]


class FailureThrottle:
    """Counts refused credentials per (client address, credential
    fingerprint). Past `limit` different refused credentials from one
    address within `window` seconds, that address's further refusals are
    answered 429 until its oldest one is `window` seconds old.

    A client repeating one refused credential (a stale token, a session
    bearer of its own) counts once; a client trying many counts each. The
    fingerprint is a keyed hash, so no credential is kept in memory. Memory
    is bounded by `max_entries` pairs: the address refused least recently is
    forgotten first, in O(1), never by scanning the others.
    """

    def __init__(self, limit: int = 30, window: float = 60.0, max_entries: int = 50_000) -> None:
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self._key = os.urandom(16)
        # address -> fingerprint -> time of its latest refusal, oldest first;
        # addresses in order of their latest refusal, oldest first.
        self._refused: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()
        self._entries = 0

    def fingerprint(self, credential: bytes) -> bytes:
        return hashlib.blake2b(credential, key=self._key, digest_size=16).digest()

    def _recent(self, client: str, now: float) -> OrderedDict[bytes, float] | None:
        """The client's refusals still inside the window (older ones dropped)."""
        refused = self._refused.get(client)
        if refused is None:
            return None
        while refused and now - next(iter(refused.values())) >= self.window:
            refused.popitem(last=False)
            self._entries -= 1
        if not refused:
            del self._refused[client]
            return None
        return refused

    def limited(self, client: str) -> bool:
        """True while `client` is over the limit."""
        refused = self._recent(client, time.monotonic())
        return refused is not None and len(refused) >= self.limit

    def refused(self, client: str, credential: bytes) -> bool:
        """Count one refused `credential` (the raw `Authorization` value, or
        b"" for none) from `client`. True when the client was already over
        the limit: answer 429, and this refusal is not counted, so a client
        that waits gets its next try within the window."""
        now = time.monotonic()
        refused = self._recent(client, now)
        if refused is not None and len(refused) >= self.limit:
            return True
        if refused is None:
            refused = self._refused[client] = OrderedDict()
        else:
            self._refused.move_to_end(client)
        key = self.fingerprint(credential)
        if key in refused:
            refused.move_to_end(key)
        else:
            self._entries += 1
        refused[key] = now
        while self._entries > self.max_entries and len(self._refused) > 1:
            _, forgotten = self._refused.popitem(last=False)
            self._entries -= len(forgotten)
        return False

    def __len__(self) -> int:
        """How many (address, fingerprint) pairs are tracked."""
        return self._entries
