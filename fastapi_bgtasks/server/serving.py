"""③ Which tasks the workers connected to this app process serve: each feed
announces its task names (and a fingerprint of each signature) when it
opens. The run document says when a waiting run's task has no such worker,
the reaper's pass logs a warning once per task whose due runs wait with
none, and a worker whose signature of a task differs from the app's is
logged once.

Only feeds open in this process are known: with several app processes, a
worker connected to another one is not counted here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["Serving"]

log = logging.getLogger("fastapi_bgtasks.feed")


class Serving:
    """Open feeds per task name, and the task names already warned about."""

    def __init__(self) -> None:
        self._feeds: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._signatures_warned: set[tuple[str, str]] = set()
        # The fingerprints each worker announced, by task name: the claim's keys.
        self.keys: dict[str, dict[str, str]] = {}

    def opened(self, tasks: Iterable[str]) -> None:
        for name in tasks:
            self._feeds[name] += 1
            self._warned.discard(name)  # served again: warn anew if it stops

    def closed(self, tasks: Iterable[str]) -> None:
        for name in tasks:
            self._feeds[name] -= 1
            if self._feeds[name] <= 0:
                del self._feeds[name]

    def feeds_for(self, tasks: Iterable[str]) -> int:
        """How many open feeds serve `tasks` (the most for any one of them):
        how many ways a claim shares the due runs."""
        return max((self._feeds[t] for t in tasks), default=0)

    def serves(self, task: str) -> bool:
        return self._feeds[task] > 0

    def unserved(self, tasks: Iterable[str]) -> list[str]:
        """Those of `tasks` no open feed serves and not yet warned about."""
        return [t for t in tasks if not self.serves(t) and t not in self._warned]

    def waiting_for(self, task: str) -> str | None:
        """The run document's note for a waiting run of `task`, if unserved."""
        if self.serves(task):
            return None
        return (
            f"No worker connected to this app serves task {task!r}; "
            "the run waits until one that does connects."
        )

    def warn(self, task: str, seconds: float) -> None:
        """Once per task (until a worker serves it again)."""
        if task in self._warned:
            return
        self._warned.add(task)
        log.warning(
            "Runs of task %r have been due for over %.0fs and no worker connected to "
            "this app serves that task; start a worker that does "
            "(python -m fastapi_bgtasks.worker ... --task %s)",
            task,
            seconds,
            task,
        )

    def compare(
        self, worker_id: str, signatures: Iterable[str], tasks: Mapping[str, Task[Any, Any]]
    ) -> None:
        """A worker announced `name:fingerprint` per task: kept as its keys
        (until its feeds close), and a warning once per task and fingerprint
        that differs from this app's (a worker of another version). A worker
        that announces none is taken to match."""
        keys: dict[str, str] = {}
        for announced in signatures:
            name, _, fingerprint = announced[:300].rpartition(":")
            if name and fingerprint:
                keys[name] = fingerprint[:64]
            task = tasks.get(name)
            if task is None or fingerprint == task.codec.fingerprint:
                continue
            seen = (name, fingerprint) in self._signatures_warned
            if seen or len(self._signatures_warned) > 1000:  # bounded: workers choose them
                continue
            self._signatures_warned.add((name, fingerprint))
            log.warning(
                "Worker %s serves task %r with a signature other than this app's "
                "(%r, here %r): runs whose arguments it cannot take are handed back "
                "to other workers",
                worker_id,
                name,
                fingerprint[:64],
                task.codec.fingerprint,
            )
        if keys:
            self.keys[worker_id] = keys
