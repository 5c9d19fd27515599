"""When the workers' child processes (where sync runs execute) lived.

A child killed by its watchdog or by its worker writes no end line for the
run it was executing, so the ledger alone cannot say when that execution
stopped. `ChildWatch` samples every worker's children every 50 ms and keeps,
for each child (a pid and its creation time, so a reused pid is another
child), when it was last seen alive and when it was first seen gone: exited,
or a zombie waiting for its parent to reap it (a zombie executes nothing).
An open execution in a child ended before the child was first seen gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

INTERVAL = 0.05


@dataclass
class Lifetime:
    pid: int
    parent: int
    created: float  # wall clock, as psutil reports it (10 ms resolution)
    first_seen: float  # monotonic, as every time below
    last_alive: float
    gone: float | None = None  # first seen exited or a zombie


class ChildWatch(threading.Thread):
    """Samples the children of `parents()` (the live workers' pids) until
    `halt` is set. Children are followed by pid once seen, so one whose
    worker was killed (reparented) is still watched until it ends."""

    def __init__(self, parents: Callable[[], list[int]], interval: float = INTERVAL) -> None:
        super().__init__(daemon=True, name="child-watch")
        self.parents = parents
        self.interval = interval
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.lives: dict[tuple[int, float], Lifetime] = {}
        self._watched: dict[tuple[int, float], psutil.Process] = {}
        self.longest_gap = 0.0  # the longest time between two samples

    def run(self) -> None:
        last = time.monotonic()
        while not self.halt.is_set():
            self.sample()
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        for parent in self.parents():
            try:
                kids = psutil.Process(parent).children()
            except psutil.Error:
                continue
            for kid in kids:
                try:
                    key = (kid.pid, kid.create_time())
                except psutil.Error:
                    continue  # gone already: never seen alive, not ours to date
                if key not in self._watched and key not in self.lives:
                    now = time.monotonic()
                    self._watched[key] = kid
                    with self.lock:
                        self.lives[key] = Lifetime(kid.pid, parent, key[1], now, now)
        for key, proc in list(self._watched.items()):
            checked = time.monotonic()  # alive at some moment after this
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            with self.lock:
                if alive:
                    self.lives[key].last_alive = checked
                else:
                    self.lives[key].gone = time.monotonic()  # dead before this
                    del self._watched[key]

    def life_of(self, pid: int, at_wall: float) -> Lifetime | None:
        """The child `pid` that was running at wall time `at_wall` (a pid may
        be reused): the last one created by then."""
        with self.lock:
            mine = [life for (p, _), life in self.lives.items() if p == pid]
        mine = [life for life in mine if life.created <= at_wall + 0.05]
        return max(mine, key=lambda life: life.created) if mine else None
