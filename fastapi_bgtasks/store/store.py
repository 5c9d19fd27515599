"""② The store's facade: one object the app, the hub and the submission
module hold, made of the parts that each do one thing (submits,
transitions, reports, reads, wake-ups) on one database connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from . import migrations, watch
from .dialect import Database
from .fastpath import FastPath
from .reads import Reads
from .reports import Reports
from .submits import Submits
from .transitions import Transitions

__all__ = ["Store"]


class Store:
    """The runs table and its statements. Each method is one of its parts'
    (see their modules); this class only wires them to one database."""

    def __init__(
        self, url: str, *, pool_size: int = 10, wall: Callable[[], float] = time.time
    ) -> None:
        self.db = Database(url, pool_size=pool_size, wall=wall)
        self._channel = watch.Channel()
        self.url = self.db.url
        self.display_url = self.db.display_url
        self.dialect = self.db.dialect
        self.is_pg = self.db.is_pg

        self._fast = FastPath(self.db, pool_size) if self.is_pg else None
        submits = Submits(self.db, self.notify, self._fast)
        self.insert_run = submits.insert_run
        self.insert_runs = submits.insert_runs

        transitions = Transitions(self.db)
        self.claim = transitions.claim
        self.release_unsent = transitions.release_unsent
        self.cancel_run = transitions.cancel_run
        self.heartbeat = transitions.heartbeat
        self.reap_expired_runs = transitions.reap_expired_runs

        self.apply_reports = Reports(self.db).apply_reports

        reads = Reads(self.db)
        self.ping = reads.ping
        self.probe_write = self.db.probe_write
        self.get_run = reads.get_run
        self.get_runs = reads.get_runs
        self.list_runs = reads.list_runs
        self.page_runs = reads.page_runs
        self.run_history = reads.run_history
        self.leased_to = reads.leased_to
        self.next_due = reads.next_due
        self.overdue = reads.overdue
        self.waiting = reads.waiting

    @property
    def direct_connections(self) -> int:
        """PostgreSQL connections the submit fast path holds open now."""
        return self._fast.opened if self._fast is not None else 0

    async def open(self) -> None:
        """Create the engines. Connects lazily: opening cannot fail on a down database."""
        self.db.open()

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self.db.close()

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION under a lock; returns the version."""
        version = await migrations.migrate(self.db)
        await self.db.anchor_lease_clock()
        return version

    async def check_schema(self) -> None:
        """For processes that must not create it: fail clearly when it is missing."""
        await migrations.check_schema(self.db)

    async def notify(self, tasks: Sequence[str]) -> None:
        """Tell other app processes that runs of these tasks are waiting."""
        await watch.notify(self.db, tasks, self._channel)

    async def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call `on_change(tasks or None)` whenever another process writes runs;
        runs until cancelled."""
        await watch.watch(self.db, on_change, self._channel)
