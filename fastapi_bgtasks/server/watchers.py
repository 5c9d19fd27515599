"""⑥ What run event streams watch: one shared, current copy of each watched
run, and the one reader that keeps those copies current.

A stream waits on its own run's event only. A change this process makes
names the runs it touched, and the reader re-reads just those, many at once
in one statement, however many streams watch them; a change it cannot name
(another process wrote) re-reads every watched run, at most once per
`poll_seconds`. Admission caps the streams per app process, per client
address and per run.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

import anyio

from ..errors import RateLimited

if TYPE_CHECKING:
    from ..store import Store
    from ..store.rows import RunRow

__all__ = ["Limits", "RunWatchers", "Subscription", "Watched"]

log = logging.getLogger("fastapi_bgtasks.streams")

K = TypeVar("K")

# Ids per re-read statement: well under every driver's parameter limit.
_CHUNK = 500


class Watched:
    """The current row of one watched run, and an event replaced each time
    that row changes (take the event *before* reading the row)."""

    __slots__ = ("changed", "row", "run_id")

    def __init__(self, run_id: uuid.UUID, row: RunRow) -> None:
        self.run_id = run_id
        self.row = row
        self.changed = anyio.Event()

    def update(self, row: RunRow) -> None:
        if row != self.row:
            self.row = row
            self.changed.set()
            self.changed = anyio.Event()


class Limits:
    """How many streams may be open: in all, per client address, per run."""

    __slots__ = ("per_client", "per_run", "total")

    def __init__(self, total: int, per_client: int, per_run: int) -> None:
        self.total = total
        self.per_client = per_client
        self.per_run = per_run


class Subscription:
    """One admitted stream's place. Released once, by whichever comes first:
    the end of the stream, the response's background task (a response whose
    stream never started, as for HEAD), or the object's collection."""

    __slots__ = ("_released", "client", "registry", "run_id", "watched")

    def __init__(self, registry: RunWatchers, run_id: uuid.UUID, client: str) -> None:
        self.registry = registry
        self.run_id = run_id
        self.client = client
        self.watched: Watched | None = None
        self._released = False

    def attach(self, row: RunRow) -> Watched:
        """Watch the run, starting from `row` unless it is watched already."""
        self.watched = self.registry.attach(self.run_id, row)
        return self.watched

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.registry.leave(self)

    async def arelease(self) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class RunWatchers:
    """The watched runs of one app process, and its open streams' counts."""

    def __init__(self) -> None:
        self._runs: dict[uuid.UUID, Watched] = {}
        self._per_run: dict[uuid.UUID, int] = {}
        self._per_client: dict[str, int] = {}
        self.open = 0
        self._pending: set[uuid.UUID] = set()
        self._everything = False
        self._wake = anyio.Event()
        # Rows re-read and statements sent by the reader, for tests and figures.
        self.reads = 0
        self.statements = 0

    def admit(self, run_id: uuid.UUID, client: str, limits: Limits) -> Subscription:
        """A place for one more stream, or `RateLimited` (before any response)."""
        if self.open >= limits.total:
            raise RateLimited("Too many event streams are open; poll GET /runs/{id} instead.")
        if self._per_client.get(client, 0) >= limits.per_client:
            raise RateLimited(
                "Too many event streams are open from this address; poll GET /runs/{id} instead."
            )
        if self._per_run.get(run_id, 0) >= limits.per_run:
            raise RateLimited(
                "Too many event streams are open on this run; poll GET /runs/{id} instead."
            )
        self.open += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._per_run[run_id] = self._per_run.get(run_id, 0) + 1
        return Subscription(self, run_id, client)

    def get(self, run_id: uuid.UUID) -> Watched | None:
        return self._runs.get(run_id)

    def attach(self, run_id: uuid.UUID, row: RunRow) -> Watched:
        watched = self._runs.get(run_id)
        if watched is None:
            watched = self._runs[run_id] = Watched(run_id, row)
            self._wake.set()  # the reader's periodic pass may start now
        return watched

    def leave(self, subscription: Subscription) -> None:
        self.open -= 1
        _decrement(self._per_client, subscription.client)
        if _decrement(self._per_run, subscription.run_id) == 0:
            self._runs.pop(subscription.run_id, None)

    def changed(self, run_ids: Iterable[uuid.UUID]) -> None:
        """These runs changed (this process changed them): re-read the watched ones."""
        watched = [run_id for run_id in run_ids if run_id in self._runs]
        if watched:
            self._pending.update(watched)
            self._wake.set()

    def changed_elsewhere(self) -> None:
        """Some runs changed, which is not known: re-read every watched run."""
        if self._runs:
            self._everything = True
            self._wake.set()

    async def serve(self, store: Store, poll_seconds: float) -> None:
        """The one reader, until cancelled. On PostgreSQL it also re-reads
        every watched run each `poll_seconds` while any is watched: reports
        applied by another app process announce nothing."""
        last_everything = time.monotonic()
        while True:
            now = time.monotonic()
            self._wake = anyio.Event()
            ids, self._pending = self._pending, set()
            if self._everything and now >= last_everything + poll_seconds:
                self._everything, last_everything = False, now
                ids.update(self._runs)
            if ids:
                await self._refresh(store, ids)
                continue
            timeout = math.inf
            if self._everything:
                timeout = last_everything + poll_seconds - now
            elif store.is_pg and self._runs:
                timeout = max(last_everything + poll_seconds - now, 0.0)
            with anyio.move_on_after(timeout) as waited:
                await self._wake.wait()
            if waited.cancelled_caught and store.is_pg:
                self._everything = True

    async def _refresh(self, store: Store, ids: set[uuid.UUID]) -> None:
        wanted = [run_id for run_id in ids if run_id in self._runs]
        try:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                rows = await store.get_runs(chunk)
                self.reads += len(chunk)
                self.statements += 1
                for row in rows:
                    watched = self._runs.get(row["id"])
                    if watched is not None:
                        watched.update(row)
        except Exception as exc:
            # The service outlives any failure: the runs are read again soon.
            log.warning("Event streams could not re-read their runs (%s); retrying", exc)
            self._pending.update(ids)
            await anyio.sleep(1.0)


def _decrement(counts: dict[K, int], key: K) -> int:
    left = counts.get(key, 1) - 1
    if left <= 0:
        counts.pop(key, None)
        return 0
    counts[key] = left
    return left
