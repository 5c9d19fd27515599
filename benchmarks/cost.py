"""What a measured window costs the machine, per run: the CPU time of the
processes on a run's path (the app, the workers, the submitter's own
figure, and on PostgreSQL the server processes serving the bench
database), the transactions committed in that database and the WAL written.

CPU is user + system seconds read with psutil. A process seen when the
window starts counts from its time then; one that appears later (a child,
a new server backend) counts from zero; `track(..., from_now=True)` starts
a process that is already running from its time at that call (DRAIN's
worker, from its first claim, leaving its imports and connect out). Server
backends are the `pg_stat_activity` rows of the bench database, looked up
at every `sample()`, which the workloads call every 0.1 s, so a backend
that exits mid-window loses at most its last 0.1 s. The harness's own
connection to the bench database is left out (`exclude`), its statements
subtracted from the commits.

Commits are the `xact_commit` delta of `pg_stat_database`. A PostgreSQL 15
backend adds its counters to that view when it goes idle, but at most once
a second, and a backend that stays idle after that holds the rest for up
to 10 s (`pg_stat_force_next_flush()` only hurries the calling backend's
own). Every backend flushes at exit, so `figures` ends the bench
database's sessions (`pg_terminate_backend`) before its last read: the
window is over and the bench is about to stop them anyway. Counters that
idle processes still held when the window started (their last few
statements) may land inside it.

WAL: the bench database's own records between the LSNs at start and stop
(benchmarks/wal.py, `wal_bytes_per_run`; without full-page images
`wal_records_bytes_per_run`), and how far the server's LSN
moved (`pg_wal_lsn_diff`, `wal_server_bytes_per_run`), which counts
anything else writing on the server in the window too; `others_active_max`
says how many other databases' backends were busy at the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import psutil

from benchmarks.harness import PG_ADMIN, Database
from benchmarks.wal import WalSource, own_bytes, reserve

SAMPLE_SECONDS = 0.1
# pg_terminate_backend's wait for each backend to be gone (its counters flushed).
TERMINATE_MS = 10_000

_BACKENDS = """
SELECT pid, datname = $1 AS ours, state = 'active' AS active
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND (datname = $1 OR backend_type = 'client backend')
"""


def cpu_seconds(pid: int) -> float | None:
    """User + system seconds of one process, None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def _tree(pid: int) -> list[int]:
    """A process and its descendants (a worker's child processes)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class _Seen:
    role: str
    base: float
    last: float


@dataclass
class Meter:
    """CPU, commits and WAL over one window of one bench's database."""

    db: Database
    _roots: dict[int, str] = field(default_factory=dict, init=False)
    _seen: dict[int, _Seen] = field(default_factory=dict, init=False)
    _excluded: set[int] = field(default_factory=set, init=False)
    _started = False
    _admin: Any = None  # an asyncpg connection to the admin database
    _commits0 = 0
    _lsn0 = ""
    _lsn1 = ""
    _wal_bytes = 0.0
    _wal: WalSource | None = None
    _others_active = 0

    async def __aenter__(self) -> Meter:
        if self.db.backend == "postgres":
            import asyncpg

            self._admin = await asyncpg.connect(PG_ADMIN)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._admin is not None:
            await self._admin.close()

    def track(self, role: str, pid: int, *, from_now: bool = False) -> None:
        """Count process `pid` (and its children) under `role`."""
        self._roots[pid] = role
        if from_now:
            self._see(role, pid, fresh=False)

    def exclude(self, pid: int) -> None:
        """A server backend not to count: the harness's own connection."""
        self._excluded.add(pid)

    def _see(self, role: str, pid: int, *, fresh: bool) -> None:
        cpu = cpu_seconds(pid)
        if cpu is None:
            return
        seen = self._seen.get(pid)
        if seen is None:
            self._seen[pid] = _Seen(role, 0.0 if fresh else cpu, cpu)
        else:
            seen.last = cpu

    async def sample(self) -> None:
        """Read every tracked process and every backend of the bench database."""
        fresh = self._started
        for root, role in list(self._roots.items()):
            for pid in _tree(root):
                self._see(role, pid, fresh=fresh and pid != root)
        if self._admin is None:
            return
        rows = await self._admin.fetch(_BACKENDS, self.db.name)
        others = 0
        for row in rows:
            if row["ours"] and row["pid"] not in self._excluded:
                self._see("pg", row["pid"], fresh=fresh)
            elif not row["ours"] and row["active"]:
                others += 1
        self._others_active = max(self._others_active, others)

    async def start(self) -> None:
        await self.sample()
        self._started = True
        if self._admin is not None:
            self._wal = await reserve(self._admin, str(self.db.name))
            self._commits0 = await self._commits()
            self._lsn0 = await self._admin.fetchval("SELECT pg_current_wal_lsn()::text")

    async def stop(self) -> None:
        await self.sample()
        if self._admin is not None:
            self._lsn1 = await self._admin.fetchval("SELECT pg_current_wal_lsn()::text")
            self._wal_bytes = float(
                await self._admin.fetchval(
                    "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)",
                    self._lsn1,
                    self._lsn0,
                )
            )

    async def _commits(self) -> int:
        await self._admin.execute("SELECT pg_stat_clear_snapshot()")
        value = await self._admin.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.db.name
        )
        return int(value)

    async def figures(
        self, runs: int, *, own_commits: int = 0, submitter_cpu_s: float | None = None
    ) -> dict[str, Any]:
        """Per run, after `stop()` and after the harness's own connection to
        the bench database closed. Ends the database's other sessions."""
        by_role = dict.fromkeys(self._roots.values(), 0.0)
        if self._admin is not None:
            by_role["pg"] = 0.0
        for seen in self._seen.values():
            by_role[seen.role] = by_role.get(seen.role, 0.0) + seen.last - seen.base
        if submitter_cpu_s is not None:
            by_role["submitter"] = submitter_cpu_s
        figures: dict[str, Any] = {
            "cpu_ms_per_run": 1000 * sum(by_role.values()) / runs,
            **{f"cpu_{role}_ms_per_run": 1000 * cpu / runs for role, cpu in by_role.items()},
        }
        if self._admin is not None:
            await self._admin.execute(
                "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity WHERE datname = $1",
                self.db.name,
                TERMINATE_MS,
            )
            commits = await self._commits() - self._commits0 - own_commits
            figures["commits_per_run"] = commits / runs
            figures["wal_server_bytes_per_run"] = self._wal_bytes / runs
            if self._wal is not None:
                own = await anyio.to_thread.run_sync(own_bytes, self._wal, self._lsn0, self._lsn1)
                if own is not None:
                    figures["wal_bytes_per_run"] = own.total / runs
                    figures["wal_records_bytes_per_run"] = own.records / runs
            figures["others_active_max"] = self._others_active
        return figures
